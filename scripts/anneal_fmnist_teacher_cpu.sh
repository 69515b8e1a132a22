#!/usr/bin/env bash
# A tried CPU second stage for the Fashion-MNIST teacher's stage 1 (not kept: it probes no better; see
# benchmarks/results/teacher_anneal/): continue stage 1 (7 GPU minutes at an effectively constant lr; it was
# teachers/ddpm-fashion-mnist-32 until commit abc9da0, and scripts/train_fmnist_teacher_gpu.sh writes it to
# runs/teacher-fmnist-gpu/stage1/export) for 1,700 steps of 256 on a 2-core CPU, bf16, with the cosine decaying to 0 (fresh AdamW with 100
# warm-up steps, fresh EMA). 95 minutes on a shared 2-core Xeon with AMX; stop and continue it with `--resume latest`.
#   bash scripts/anneal_fmnist_teacher_cpu.sh [INIT_FROM] [extra train_teacher.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
INIT_FROM=${1:-runs/teacher-fmnist-gpu/stage1/export}
shift || true
python training/train_teacher.py --data-dir "$DATA_DIR" --init-from "$INIT_FROM" --resolution 32 \
  --block-out-channels 32,64,128,128 --layers-per-block 1 --batch-size 256 --max-steps 1700 --max-minutes 112 \
  --lr 3e-4 --lr-scheduler cosine --lr-warmup-steps 100 --mixed-precision bf16 --checkpoint-every 425 \
  --checkpoint-every-minutes 15 --sample-steps 50 --num-samples 64 --seed 1 --num-workers 0 --threads 2 \
  --fp16-export --log-every 25 --output-dir runs/teacher-fmnist-anneal --export-dir runs/teacher-fmnist-anneal/export \
  "$@"
