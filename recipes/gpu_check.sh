#!/usr/bin/env bash
# One prepared GPU session, at most about 8 minutes on one H100/H200: CUDA checks, then the training, inference and
# model benchmarks at 3B and 7B shapes against transformers(+peft), and peak memory at 4k and 16k tokens.
# Writes $OUT/gpu_check.json (OUT defaults to ./gpu_out) and one log per section; see recipes/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
# bitsandbytes for the QLoRA section, where its wheel was carried along (the GPU machine has no network):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl bitsandbytes==0.50.2
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/vlft-site .whl/bitsandbytes-*.whl &&
    export PYTHONPATH=/tmp/vlft-site${PYTHONPATH:+:$PYTHONPATH}
fi
exec python3 recipes/gpu_check.py --out "${OUT:-gpu_out}" "$@"
