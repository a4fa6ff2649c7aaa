#!/usr/bin/env bash
# The shapes run of 2026-11-26 (README, "Training"): DuoGen's two stages from scratch on a 2-core CPU.
# Run from the repository root with the package installed (pip install -e '.[dev]'). Seeds are fixed.
# The VAE and stage 1 ran side by side (about 40 minutes), then both stage-2 runs side by side (about
# 45 minutes). The VAE comes from the oracle diagnostic's recipe (rendered training-split scenes, 1,200
# steps of 16, warm-up and decay), so that both stage-2 runs draw on the same latents.
set -euo pipefail
export DUOGEN_HOME=${DUOGEN_HOME:-$PWD/runs/home}

python -c "from duogen_agents.worlds.shapes import write_dataset; write_dataset('runs/shapes-train', 1600, split='train', seed=0)"

# The VAE (its ceiling on held-out scenes is printed: alignment of its reconstructions).
OMP_NUM_THREADS=1 python benchmarks/shapes_oracle_dit.py --out runs/vae --vae-steps 1200 --vae-batch 16 \
  --dit-steps 0 --threads 1 &

# Stage 1: the planner (tiny:shapes, from random weights) on the 9,584 planner calls of 1,600 tasks.
OMP_NUM_THREADS=2 duogen train stage1 --base examples/shapes/base.toml --data runs/shapes-train/tasks.jsonl \
  --out runs/stage1 --steps 3000 --batch 4 --warmup 100 --seed 0 --save-every 500
wait

# Stage 2: DuoGen's path (the connector on the frozen planner's states) and the prompt-only row (T5).
OMP_NUM_THREADS=1 duogen train stage2 --planner runs/stage1 --vae-from runs/vae --data runs/shapes-train/tasks.jsonl \
  --out runs/stage2 --steps 8000 --batch 8 --seed 0 --save-every 1000 &
OMP_NUM_THREADS=1 duogen train stage2 --planner runs/stage1 --context t5 --vae-from runs/vae \
  --data runs/shapes-train/tasks.jsonl --out runs/stage2-t5 --steps 8000 --batch 8 --seed 0 --save-every 1000 &
wait

# The image half from correct prompts (held-out compositions), then the four rows end to end.
for args in "--aligned runs/stage2/aligned" "--aligned runs/stage2/aligned --no-frames" "--aligned runs/stage2-t5/aligned"; do
  python benchmarks/shapes_stage2_eval.py $args --preset runs/stage1/preset.json --tasks 48
done
python examples/shapes/rows.py
duogen eval --bench shapes --limit 24 --reference --out runs/eval --preset runs/rows/shapes.json \
  --preset runs/rows/no-frames.json --preset runs/rows/prompt-only.json --preset runs/rows/untrained-frames.json
