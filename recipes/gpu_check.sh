#!/usr/bin/env bash
# One prepared GPU session, at most about 8 minutes on one H100/H200: CUDA checks, then the training, inference and
# model benchmarks at 3B and 7B shapes against transformers(+peft), and peak memory at 4k and 16k tokens.
# Writes $OUT/gpu_check.json (OUT defaults to ./gpu_out) and one log per section; see recipes/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 recipes/gpu_check.py --out "${OUT:-gpu_out}" "$@"
