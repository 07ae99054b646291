#!/usr/bin/env bash
# Creates .venv and installs vlft into it, on a fresh machine or again on a used one (idempotent).
# torch: the CPU build where no NVIDIA GPU is present (a plain `pip install torch` would pull a multi-GB CUDA build),
# the normal build otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q torch
else
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
