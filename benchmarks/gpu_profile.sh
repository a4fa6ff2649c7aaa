#!/usr/bin/env bash
# One GPU session (device machine), in one call: install the carried wheels (.whl, made by
# benchmarks/gpu_wheels.sh), then at real shapes (random weights): where a planner call's time goes against
# plain `generate` and a bare decode loop, one image ours vs the plain pipeline, the 4-image plan ours vs
# the plain baseline, then offloaded (the 24 GB preset's mode), then compiled (DiT regional + planner
# CUDA-graph decode) with every model resident again; last, the prefix-cache tests on the GPU if time is
# left. Each part's output is kept in $OUT as it comes. Usage: bash benchmarks/gpu_profile.sh
# Runs so far (H200; README "Speed and memory"): 2026-11-27, the offloaded plan (3 frames ahead, before the
# arena), then every model resident, compiled, then with the DiT's first-block cache:
#   VARIANTS="--offload --compile-dit --compile-planner --first-block-cache 0.1" PROFILE_TOKENS=0 REPEATS=0 \
#     VARIANT_REPEATS=0 BENCH_STEPS=20 BUDGET_S=0 bash benchmarks/gpu_profile.sh
# 2026-11-28, the 24 GB preset as shipped (28 frames ahead, the VAE in tiles, one arena: 17.73 GiB allocated
# at peak), the Video2World encode check and guidance in one batch, one call of 552 s (building the random
# models takes about 2 minutes of it; the offloaded plan, its own warm-up at 28 ahead, 164 s):
#   V2W_CHECK=1 CFG_CHECK=1 VARIANTS="--offload" PROFILE_TOKENS=0 REPEATS=0 VARIANT_REPEATS=0 BENCH_STEPS=20 \
#     BUDGET_S=0 PLAN_TIMEOUT=500 bash benchmarks/gpu_profile.sh
# The next call: the 24 GB preset offloaded with both compile switches (the arena keeps the planner's
# addresses for its CUDA graphs; peak and time decide whether the preset turns them on). --offload-compile
# alone skips the eager offloaded run; with it the call would pass 10 minutes at 28 ahead:
#   VARIANTS="--offload-compile" PROFILE_TOKENS=0 REPEATS=0 VARIANT_REPEATS=0 BENCH_STEPS=20 BUDGET_S=0 \
#     PLAN_TIMEOUT=560 bash benchmarks/gpu_profile.sh
# V2W_CHECK=1 (about 40 s) and CFG_CHECK=1 (about 2 minutes: benchmarks/cfg_batch.py builds the T5-XXL, two
# DiTs and the VAE, then 3 columns x 3 draws x 2 pictures at 20 steps, compiled) run after the plan, in
# what DEADLINE_S leaves.
set -uo pipefail
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "from importlib.metadata import version as v; print(*(f'{p} {v(p)}' for p in ('torch', 'transformers', 'diffusers', 'xgrammar')))" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
echo "setup: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/gpu.txt"
BENCH_STEPS=${BENCH_STEPS:-35} timeout ${PLAN_TIMEOUT:-420} python3 benchmarks/visual_plan.py --real-shapes \
  --profile ${PROFILE_TOKENS:-128} --repeats ${REPEATS:-1} --variant-repeats ${VARIANT_REPEATS:-1} \
  ${VARIANTS:---compile-dit --compile-planner --offload} --threads 8 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/visual_plan.txt"
echo "plan done: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/visual_plan.txt"
# The checks below run after the plan, each only if DEADLINE_S (seconds from the start, default 580: one
# device call may run 600) leaves it a minute, and each cut off at the deadline, so the plan's figures come
# first and a late check cannot lose them.
left() { echo $(( ${DEADLINE_S:-580} - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
# V2W_CHECK=1: one Video2World draw at real shapes, 28 frames ahead, the VAE in tiles, 2 steps:
# ours (conditioning frames encoded only) against diffusers' pipeline, time, peak beyond the weights, and
# whether the latents are the same on this GPU (about a minute).
if [ -n "${V2W_CHECK:-}" ] && [ "$(left)" -gt 60 ]; then
  timeout $(cap 300) python3 benchmarks/video2world_encode.py --size 704x1280 --layers 28 --steps 2 --ahead 28 --tiles \
    --repeats 1 --no-flops 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/video2world_encode.txt"
fi
# CFG_CHECK=1: then guidance in one batch against unbatched and the plain pipeline, the DiT compiled in every
# column (benchmarks/cfg_batch.py), Text2Image and Video2World 3 frames ahead.
if [ -n "${CFG_CHECK:-}" ] && [ "$(left)" -gt 60 ]; then
  BENCH_STEPS=${BENCH_STEPS:-35} timeout $(cap 240) python3 benchmarks/cfg_batch.py --real-shapes --compile --repeats 2 \
    --threads 8 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/cfg_batch.txt"
fi
LEFT=$(( ${BUDGET_S:-540} - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 60 ]; then
  timeout $(( LEFT - 10 )) python3 -m pytest -q -p no:cacheprovider tests/test_prefix_cache.py 2>&1 | tail -4 | tee "$OUT/prefix_tests.txt"
fi
