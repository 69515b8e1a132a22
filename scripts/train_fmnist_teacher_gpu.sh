#!/usr/bin/env bash
# The committed Fashion-MNIST teacher (teachers/ddpm-fashion-mnist-32) as it was trained, in three stages on one
# GPU (bf16, EMA weights exported in fp16), 79 epochs in all:
#   1. 28.8 epochs from random weights, batch 256, lr 5e-4; stopped by its 7-minute cap at step 6,760, so its
#      cosine (laid over 100k steps) never decayed.
#   2. --init-from stage 1: 2,400 steps of 512 (20.5 epochs), lr 5e-4 with the cosine decaying to 0.
#   3. --init-from stage 2: 3,500 steps of 512 (29.9 epochs), lr 3e-4 decaying to 0, another seed (data order).
# Stage 2's step count was calibrated to fill 6 minutes beside two other runs (scripts/fmnist_teacher_gpu_sweep.sh);
# stage 3's to fill the device time that was left. A stage whose export exists is skipped, so a stopped run
# continues with the next call. DATA_DIR holds the Fashion-MNIST train IDX files (the Debian package's
# /usr/share/datasets/fashion-mnist by default). A CPU runs it too, in many hours.
#   bash scripts/train_fmnist_teacher_gpu.sh [extra train_teacher.py arguments, for every stage]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-/usr/share/datasets/fashion-mnist}
RUN=${RUN:-runs/teacher-fmnist-gpu}
stage() {  # name, then the stage's own flags
  local name=$1; shift
  [ -f "$RUN/$name/export/model_index.json" ] && { echo "$name: exported already, skipped"; return; }
  python training/train_teacher.py --data-dir "$DATA_DIR" --resolution 32 --block-out-channels 32,64,128,128 \
    --layers-per-block 1 --lr-scheduler cosine --mixed-precision bf16 --checkpoint-every 100000 \
    --checkpoint-every-minutes 100 --sample-steps 50 --num-samples 64 --fp16-export \
    --output-dir "$RUN/$name" --export-dir "$RUN/$name/export" "$@"
}
stage stage1 --batch-size 256 --max-steps 100000 --max-minutes 7 --lr 5e-4 --lr-warmup-steps 500 --seed 0 \
  --num-workers 6 --log-every 50 "$@"
stage stage2 --init-from "$RUN/stage1/export" --batch-size 512 --max-steps 2400 --lr 5e-4 --lr-warmup-steps 200 \
  --seed 0 --num-workers 4 --log-every 20 "$@"
stage stage3 --init-from "$RUN/stage2/export" --batch-size 512 --max-steps 3500 --lr 3e-4 --lr-warmup-steps 100 \
  --seed 1 --num-workers 12 --log-every 20 "$@"
echo "teacher: $RUN/stage3/export"
