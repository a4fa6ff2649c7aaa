#!/usr/bin/env bash
# One GPU session: install carried wheels, run the tiny end-to-end tests on the GPU device, then the
# overhead benchmark at real shapes. Usage (device machine): bash benchmarks/gpu_check.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, diffusers, xgrammar, langgraph; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
# The tiny preset on the GPU: the same code path with device=cuda.
python3 - <<'PY'
import time, tempfile
from pathlib import Path
from duogen_agents import Agent, load_preset
p = load_preset("tiny"); p.planner.device = "cuda"; p.image.device = "cuda"
t = time.perf_counter(); agent = Agent.from_preset(p, home=Path(tempfile.mkdtemp())); print(f"tiny on cuda: load {time.perf_counter()-t:.1f}s")
for mode in ("interleaved", "visual-plan", "draft"):
    t = time.perf_counter(); doc = agent.run("How do I repot a plant?", mode=mode, seed=0)
    print(f"tiny on cuda, {mode}: {len(doc.blocks)} blocks, {len(doc.images)} images, {time.perf_counter()-t:.2f}s")
PY
BENCH_STEPS=${BENCH_STEPS:-20} python3 benchmarks/overhead.py --real-shapes --repeats 2 2>&1 | tee "${OUT:-/tmp}/bench_real.txt"
