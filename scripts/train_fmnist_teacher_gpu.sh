#!/usr/bin/env bash
# The committed Fashion-MNIST teacher (teachers/ddpm-fashion-mnist-32) as it was trained: one GPU, 7 minutes of
# training wall time, bf16, EMA weights exported in fp16. DATA_DIR holds the Fashion-MNIST train IDX files (the
# Debian package's /usr/share/datasets/fashion-mnist by default). On a CPU it runs too, but the same number of
# images takes hours: use --resume latest to continue a stopped run.
#   bash scripts/train_fmnist_teacher_gpu.sh [extra train_teacher.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
python training/train_teacher.py --data-dir "$DATA_DIR" --resolution 32 --block-out-channels 32,64,128,128 \
  --layers-per-block 1 --batch-size 256 --max-steps 100000 --max-minutes 7 --lr 5e-4 --lr-scheduler cosine \
  --lr-warmup-steps 500 --mixed-precision bf16 --checkpoint-every 100000 --checkpoint-every-minutes 100 \
  --sample-steps 50 --num-samples 64 --seed 0 --num-workers 6 --fp16-export --log-every 50 \
  --output-dir runs/teacher-fmnist-gpu --export-dir runs/teacher-fmnist-gpu/export "$@"
