"""Stage 2 on held-out compositions, given the right prompts: how well a trained ``aligned`` folder draws.

The full evaluation (``duogen eval --bench shapes``) scores planner and DiT together. This script scores
the image half alone: held-out tasks of the shapes world (the evaluation split) are played back through
the real turn graph by the teacher (as ``duogen train`` builds its examples), so each image request has
the conversation and the correct action. The DiT then draws from that request's context, exactly as the
``aligned`` family does at inference (the frozen planner's states over the prompt it wrote, or T5's
states over the prompt text for a ``--context t5`` folder), with its own previous picture of the task
as the conditioning frame (``--no-frames``: a blank frame). The detectors score each picture.

    python benchmarks/shapes_stage2_eval.py --aligned runs/stage2/aligned --preset runs/stage1/preset.json --tasks 48
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


def evaluate(
    aligned: Path,
    preset_path: Path,
    *,
    tasks: int,
    seed: int = 0,
    frames: bool = True,
    steps: int = 20,
    split: str = "eval",
    start: float = 1.0,
    keep: float = 0.0,
) -> dict[str, Any]:
    import torch

    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.presets import load_preset
    from duogen_agents.training import stage2 as s2
    from duogen_agents.training.data import load_tasks, planner_examples
    from duogen_agents.worlds import shapes as W

    preset = load_preset(preset_path)
    vae, transformer, connector, meta = s2.load_aligned(aligned)
    size, tokens = int(meta["size"]), int(meta["tokens"])
    if meta.get("context", "planner") == "t5":
        encoder, tokenizer = s2.load_text_encoder(aligned)
        planner = None
    else:
        planner = TransformersPlanner.from_spec(preset.planner, None)
    with tempfile.TemporaryDirectory(prefix="duogen-stage2-eval-") as tmp:
        data = W.write_dataset(Path(tmp) / "data", tasks, split=split, seed=seed)
        examples = [e for e in planner_examples(load_tasks(data), preset, Path(tmp) / "t") if e.picture is not None]
    alignment: list[float] = []
    by_kind: dict[str, list[float]] = {"fresh": [], "edit": []}
    fidelity: list[float] = []
    consistency: list[float] = []
    previous: dict[str, Any] = {}
    t0 = time.time()
    for i, e in enumerate(examples):
        want = W.detect(e.picture).scene
        before = e.references[-1] if e.references else None
        reference = previous.get(e.task) if before is not None and frames else None
        with torch.no_grad():
            if planner is not None:
                states, mask = s2.planner_states(planner, e, tokens)
            else:
                states, mask = s2.text_encoder_states(encoder, tokenizer, s2.prompt_of(e.target), tokens)
        drawn = s2.sample(
            transformer,
            vae,
            connector,
            states,
            reference,
            mask=mask,
            size=size,
            steps=steps,
            seed=i,
            start=start,
            keep=keep,
        )
        drawn = drawn.resize((W.CANVAS, W.CANVAS))
        alignment.append(W.score_alignment(drawn, want))
        by_kind["edit" if reference is not None else "fresh"].append(alignment[-1])
        fidelity.append(W.score_fidelity(drawn, want))
        if before is not None and e.task in previous:
            value = W.score_consistency(previous[e.task], drawn, W.detect(before).scene, want)
            if value is not None:
                consistency.append(value)
        previous[e.task] = drawn

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 3) if xs else None

    return {
        "aligned": str(aligned), "context": meta.get("context", "planner"), "frames": frames, "split": split, "tasks": tasks, "start": start, "keep": keep,
        "pictures": len(examples), "alignment": mean(alignment),
        "alignment_fresh": mean(by_kind["fresh"]), "alignment_edit": mean(by_kind["edit"]), "fidelity": mean(fidelity),
        "consistency": mean(consistency), "pairs": len(consistency), "seconds": round(time.time() - t0, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", type=Path, required=True, help="OUT/aligned of duogen train stage2")
    p.add_argument("--preset", type=Path, required=True, help="the stage-1 preset (its planner and limits)")
    p.add_argument("--tasks", type=int, default=48, help="held-out tasks (evaluation split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="Euler steps per picture")
    p.add_argument("--no-frames", action="store_true", help="withhold the earlier picture (blank frame)")
    p.add_argument(
        "--split",
        choices=["eval", "train"],
        default="eval",
        help="eval: held-out compositions; train: the training compositions (with --seed 0, the first tasks of a training set written with seed 0)",
    )
    p.add_argument(
        "--start",
        type=float,
        default=1.0,
        help="sampling starts at this time from the connector's regressed latent (1: from pure noise)",
    )
    p.add_argument(
        "--keep",
        type=float,
        default=0.0,
        help="blended sampling: keep the earlier picture where the predicted change is below this (0: off)",
    )
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    row = evaluate(
        args.aligned,
        args.preset,
        tasks=args.tasks,
        seed=args.seed,
        frames=not args.no_frames,
        steps=args.steps,
        split=args.split,
        start=args.start,
        keep=args.keep,
    )
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
