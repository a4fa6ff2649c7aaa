#!/usr/bin/env bash
# The shapes runs of 2026-11-26/27 (README, "Training"): the fifth run, then the sixth's changes at the end
# (the shipped `shapes` preset). DuoGen's two stages from scratch on a 2-core CPU, after a language-model
# pretraining of the planner. A picture that changes the one before it is an edit whose prompt names the
# change alone (shapes._answer), and the connector's regression head predicts the change from the
# conditioning frame. Run from the repository root with the package installed (pip install -e '.[dev]').
# Seeds are fixed. About two and a half hours on this 2-core CPU, two runs at a time.
set -euo pipefail
export DUOGEN_HOME=${DUOGEN_HOME:-$PWD/runs/home}

# The data: 1,600 training-split tasks with their answers and pictures, and 40,000 more tasks as plain
# text for the planner's pretraining (another seed; no pictures).
python -c "
from duogen_agents.worlds.shapes import write_corpus, write_dataset
write_dataset('runs/shapes-train', 1600, split='train', seed=0)
write_corpus('runs/corpus.jsonl', 40000, seed=1)"

# The VAE (its ceiling on held-out scenes is printed: alignment of its reconstructions), beside the
# planner's pretraining: next-token loss over every token of the 40,000 documents.
OMP_NUM_THREADS=1 python benchmarks/shapes_oracle_dit.py --out runs/vae --vae-steps 1200 --vae-batch 16 \
  --dit-steps 0 --threads 1 &
OMP_NUM_THREADS=1 duogen train pretrain --base examples/shapes/base.toml --text runs/corpus.jsonl --out runs/pretrain \
  --steps 2000 --batch 32 --lr 2e-3 --warmup 100 --seed 0 --save-every 250
wait

# Stage 1 from the pretrained planner, beside the prompt-only row's stage 2 (T5 states: it reads no
# planner, so it needs only a preset with the same limits, the pretraining run's).
OMP_NUM_THREADS=1 duogen train stage2 --planner runs/pretrain --context t5 --vae-from runs/vae \
  --data runs/shapes-train/tasks.jsonl --out runs/stage2-t5 --steps 8000 --batch 8 --seed 0 --save-every 1000 &
OMP_NUM_THREADS=1 duogen train stage1 --base runs/pretrain --data runs/shapes-train/tasks.jsonl \
  --out runs/stage1 --steps 2000 --batch 4 --lr 5e-4 --warmup 100 --seed 0 --save-every 500
# ... continued for 2,000 more steps (its held-out exact prompts were still climbing: 7, 13, 32 of 44 at
# 500, 1,000, 2,000 steps).
OMP_NUM_THREADS=1 duogen train stage1 --base runs/stage1 --data runs/shapes-train/tasks.jsonl \
  --out runs/stage1b --steps 2000 --batch 4 --lr 3e-4 --warmup 50 --seed 1 --save-every 500

# Stage 2, DuoGen's path: the connector on the frozen stage-1 planner's states.
# (The fifth run stopped this one after its step-7,000 checkpoint, for the session's time, and took that
# checkpoint: examples/shapes/from_checkpoint.py 7000. Run to the end, it writes runs/stage2/aligned itself.)
OMP_NUM_THREADS=1 duogen train stage2 --planner runs/stage1b --vae-from runs/vae --data runs/shapes-train/tasks.jsonl \
  --out runs/stage2 --steps 10000 --batch 8 --seed 0 --save-every 1000
wait

# The planner half: image prompts on held-out tasks (the pretrained planner in its text format, then stage 1).
python benchmarks/shapes_planner_eval.py --preset runs/pretrain/preset.json --tasks 48 --text
python benchmarks/shapes_planner_eval.py --preset runs/stage1/preset.json --tasks 24
python benchmarks/shapes_planner_eval.py --preset runs/stage1b/preset.json --tasks 24

# The image half from correct prompts (held-out compositions), then the rows end to end.
for args in "--aligned runs/stage2/aligned" "--aligned runs/stage2/aligned --no-frames" \
  "--aligned runs/stage2/aligned --start 0.5" "--aligned runs/stage2-t5/aligned"; do
  python benchmarks/shapes_stage2_eval.py $args --preset runs/stage1b/preset.json --tasks 48
done
python examples/shapes/rows.py
duogen eval --bench shapes --limit 24 --reference --out runs/eval --preset runs/rows/shapes.json \
  --preset runs/rows/no-frames.json --preset runs/rows/prompt-only.json --preset runs/rows/untrained-frames.json \
  --preset runs/rows/shapes-strength-0.5.json --preset runs/rows/no-frames-strength-0.5.json

# The fifth run shipped here: the planner and the aligned folder, at strength 0.5 (chosen on training
# compositions): python examples/shapes/ship.py runs/stage1b runs/stage2 --strength 0.5

# ---- The sixth run (2026-11-27), on top of the fifth: reworded requests, stage 2 finished. ----
# Training data with reworded requests (shapes.paraphrased; the same tasks and pictures, the first 1,600
# are the fifth run's): half of 1,600, then 60% of 3,200.
python -c "
from duogen_agents.worlds.shapes import write_dataset
write_dataset('runs/shapes-train-p', 1600, split='train', seed=0, paraphrase=0.5)
write_dataset('runs/shapes-train-p2', 3200, split='train', seed=0, paraphrase=0.6)"
# Stage 1 continued from the fifth run's planner, twice. (The run of 2026-11-27 gave --base shapes for the
# first: the shipped preset, whose planner is runs/stage1b's.)
OMP_NUM_THREADS=1 duogen train stage1 --base runs/stage1b --data runs/shapes-train-p/tasks.jsonl \
  --out runs/stage1p --steps 2000 --batch 4 --lr 3e-4 --warmup 50 --seed 2 --save-every 500
OMP_NUM_THREADS=1 duogen train stage1 --base runs/stage1p --data runs/shapes-train-p2/tasks.jsonl \
  --out runs/stage1q --steps 3000 --batch 4 --lr 3e-4 --warmup 50 --seed 4 --save-every 1000
# Stage 2 from the fifth run's DiT and connector (and its VAE), on the new planner's states. (The run gave
# --init duogen_agents/weights/shapes/aligned: the fifth run's shipped aligned folder, runs/stage2/aligned.)
# First 6,000 steps at 3e-4 (runs/stage2q), then, shipped, 3,000 steps at 1e-4 (runs/stage2r).
OMP_NUM_THREADS=1 duogen train stage2 --planner runs/stage1q --init runs/stage2 \
  --data runs/shapes-train-p2/tasks.jsonl --out runs/stage2q --steps 6000 --batch 8 --lr 3e-4 --warmup 100 \
  --seed 3 --save-every 1000
OMP_NUM_THREADS=1 duogen train stage2 --planner runs/stage1q --init runs/stage2 \
  --data runs/shapes-train-p2/tasks.jsonl --out runs/stage2r --steps 3000 --batch 8 --lr 1e-4 --warmup 50 \
  --seed 5 --save-every 1000
python benchmarks/shapes_planner_eval.py --preset runs/stage1q/preset.json --tasks 24
python benchmarks/shapes_planner_eval.py --preset runs/stage1q/preset.json --tasks 24 --paraphrase 1
for run in runs/stage2q runs/stage2r; do
  for args in "" "--no-frames" "--keep 0.3"; do
    python benchmarks/shapes_stage2_eval.py --aligned $run/aligned --preset runs/stage1q/preset.json \
      --tasks 48 --start 0.5 $args
  done
done
python examples/shapes/rows.py runs/stage2r runs/stage2-t5
duogen eval --bench shapes --limit 48 --reference --out runs/eval6 --preset runs/rows/shapes-keep.json \
  --preset runs/rows/shapes-strength-0.5.json --preset runs/rows/no-frames-strength-0.5.json \
  --preset runs/rows/untrained-frames.json
# The shipped preset: strength 0.5 and keep 0.3.
python examples/shapes/ship.py runs/stage1q runs/stage2r --strength 0.5 --keep 0.3
