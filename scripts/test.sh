#!/usr/bin/env bash
# The test suite: set up, then run every offline CPU test (GPU and network tests are skipped by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/python.sh
HF_HUB_OFFLINE=1 "$PY" -m pytest -n auto "$@"  # one worker per core (pytest-xdist)
