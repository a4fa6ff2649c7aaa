#!/usr/bin/env bash
# A short device run (when little device time is left): the 4-image plan at real shapes with
# fewer diffusion steps, ours against the plain baseline, then offloaded (peak memory of the 24 GB mode).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
BENCH_STEPS=${BENCH_STEPS:-10} timeout ${PLAN_TIMEOUT:-200} python3 benchmarks/visual_plan.py --real-shapes \
  --repeats 1 --offload --variant-repeats 0 --threads 8 2>&1 | grep --line-buffered -v Warning | tee "$OUT/visual_plan.txt"
