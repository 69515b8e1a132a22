#!/usr/bin/env bash
# Installs everything the trainer and the tests need on a fresh Debian machine (idempotent, quick when done).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh

# torch first, from exact versions: PyPI's torchvision only imports beside its own torch build
"$PY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install --quiet -e ".[test]"

# Fashion-MNIST's original IDX files for the default in-domain recipe (Debian package, MIT licence)
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: no Fashion-MNIST in /usr/share/datasets/fashion-mnist; as root run: apt-get install" \
         "dataset-fashion-mnist (or pass --data-dir to a folder of its IDX files)" >&2
  fi
fi
