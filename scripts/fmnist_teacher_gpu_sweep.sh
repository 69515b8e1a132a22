#!/usr/bin/env bash
# How the teacher's second stage and its width were chosen: three Fashion-MNIST teachers trained side by side on one
# GPU (it ran on an H200 as: TRAIN_S=400 CAL_STEPS=150 BATCH=512 W=4 bash scripts/fmnist_teacher_gpu_sweep.sh, with
# INIT the stage-1 teacher, then committed as teachers/ddpm-fashion-mnist-32, and DATA a copy of the train IDX files),
# each with a cosine lr that reaches 0 inside TRAIN_S seconds: a short calibration run measures each variant's step
# rate (all three at once, as in the real run), then the real run gets --max-steps = rate x TRAIN_S x 0.9 (and
# --max-minutes as a hard cap).
#   A: stage 1 of scripts/train_fmnist_teacher_gpu.sh continued (--init-from INIT), same architecture
#   B: channels 32,64,192,192 from scratch      C: channels 32,64,256,256 from scratch
# Exports, curves and logs are packed into OUT/teachers.tar.part_* (the device tool returns files of 16 MB at most).
# The probe of each export: python training/probe_teacher.py --teacher EXPORT --timesteps 50 --taps
# up_blocks.1.resnets.1 up_blocks.0.resnets.1 --train-images 60000 --test-images 10000
set -u
# the device machine lacks diffusers: its wheels travel in .whl/ (skipped where .whl/ is absent)
[ -n "${SKIP_WHEELS:-}" ] || [ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DATA=${DATA:-/usr/share/datasets/fashion-mnist}; TRAIN_S=${TRAIN_S:-360}; CAL_STEPS=${CAL_STEPS:-120}; BATCH=${BATCH:-512}; W=${W:-4}
INIT=${INIT:-runs/teacher-fmnist-gpu/stage1/export}; EXTRA=${EXTRA:-}; R=${R:-/tmp/dt}; OUT=${OUT:-/tmp/dt_out}; mkdir -p $R $OUT
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); GPU=${GPU:-cpu}
echo "device: $GPU" | tee $OUT/summary.txt
args() {  # variant -> its architecture/init/lr flags
  case $1 in
    A) echo "--init-from $INIT --block-out-channels 32,64,128,128 --lr 5e-4 --lr-warmup-steps 200" ;;
    B) echo "--block-out-channels 32,64,192,192 --lr 7e-4 --lr-warmup-steps 500" ;;
    C) echo "--block-out-channels 32,64,256,256 --lr 7e-4 --lr-warmup-steps 500" ;;
  esac
}
train() {  # variant phase max_steps max_minutes
  python3 training/train_teacher.py --data-dir $DATA --resolution 32 --layers-per-block 1 --batch-size $BATCH \
    $(args $1) --max-steps $3 --max-minutes $4 --lr-scheduler cosine --mixed-precision bf16 \
    --checkpoint-every 1000000 --checkpoint-every-minutes 1000 --num-samples 64 --sample-steps 50 --seed 0 \
    --num-workers $W --fp16-export --log-every 20 $EXTRA \
    --hardware-note "1x $GPU (device machine, shared by three teacher runs A/B/C), 16 CPU cores" \
    --output-dir $R/$2_$1 --export-dir $R/$2_$1/export > $R/log_$2_$1.txt 2>&1
  echo "$1 $2 rc=$?" | tee -a $OUT/summary.txt
}
rate() {  # steps per second between the first and last logged step of a calibration run
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; a,b=r[0],r[-1]; print((b['step']-a['step'])/max(b['wall_s']-a['wall_s'],1e-3))" $R/cal_$1/metrics.jsonl
}
for v in A B C; do train $v cal $CAL_STEPS 3 & done; wait
for v in A B C; do
  rt=$(rate $v) || rt=0
  steps=$(python3 -c "print(max(int($rt*$TRAIN_S*0.9), 50))")
  echo "$v calibrated $rt steps/s -> --max-steps $steps" | tee -a $OUT/summary.txt
  eval "STEPS_$v=$steps"
done
CAP=$(python3 -c "print($TRAIN_S/60+0.5)")
train A run $STEPS_A $CAP & train B run $STEPS_B $CAP & train C run $STEPS_C $CAP & wait
for v in A B C; do
  tail -n 1 $R/run_$v/metrics.jsonl | tee -a $OUT/summary.txt
  tr "\r" "\n" < $R/log_run_$v.txt | grep -E "INFO train_teacher|Error" | tail -n 4 | tee -a $OUT/summary.txt
  mkdir -p $R/pack/$v && cp -r $R/run_$v/export $R/pack/$v/ && cp $R/run_$v/metrics.jsonl $R/pack/$v/
  tr "\r" "\n" < $R/log_run_$v.txt | grep -v "it/s\|s/it" | tail -c 6000 > $R/pack/$v/log.txt
done
tar -C $R/pack -cf - . | split -b 15m - $OUT/teachers.tar.part_
ls -la $OUT
