#!/usr/bin/env bash
# One prepared GPU session: CUDA tests, then the model and training benchmarks against transformers(+peft).
# Run on a CUDA machine from the repo root; results go to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
timeout 120 python3 recipes/bench_model.py --device cuda --dtype bfloat16 --preset 3B --layers 8 --vision-depth 8 \
  --text-tokens 2000 --reps 10 2>&1 | grep -v USDT | tee "$OUT/bench_model.txt"
if [ -f recipes/bench_train.py ]; then
  timeout 180 python3 recipes/bench_train.py --device cuda ${BENCH_TRAIN_ARGS:-} 2>&1 | grep -v USDT | tee "$OUT/bench_train.txt"
fi
