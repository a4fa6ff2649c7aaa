#!/usr/bin/env bash
# One GPU session (device machine): install the carried wheels (.whl, made by benchmarks/gpu_wheels.sh), run the
# prefix-cache tests on the GPU (the tiny presets pick cuda), then the 4-image visual plan at real
# shapes: ours against the plain baseline, then compiled (DiT regional + planner CUDA-graph decode),
# then offloaded (the 24 GB preset's mode). Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp}
python3 -c "import duogen_agents.agent, duogen_agents.models.planner, diffusers, langgraph, langchain_core" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, diffusers, xgrammar; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_prefix_cache.py 2>&1 | tail -4 | tee "$OUT/prefix_tests.txt"
BENCH_STEPS=${BENCH_STEPS:-35} timeout ${PLAN_TIMEOUT:-410} python3 benchmarks/visual_plan.py --real-shapes \
  --repeats ${REPEATS:-2} --compile-dit --compile-planner --offload --threads 8 2>&1 | grep --line-buffered -v Warning | tee "$OUT/visual_plan.txt"
