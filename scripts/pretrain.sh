#!/usr/bin/env bash
# The main job: set up, then run the trainer's default (in-domain Fashion-MNIST recipe with the committed teacher).
# Extra arguments go to training/pretrain.py, e.g. `bash scripts/pretrain.sh --max-steps 50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/python.sh
"$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  training/pretrain.py "$@"
