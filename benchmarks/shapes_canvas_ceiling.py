"""What a canvas size allows on the shapes world's held-out tasks, before any model draws anything.

The aligned family draws at ``size`` pixels and the evaluation reads each picture scaled to the world's
canvas. This script takes the held-out tasks' own pictures (the ground truth), brings them to ``size``
and back exactly as a drawn picture travels (``stage2.to_tensor`` then ``to_image`` and the scaling),
and scores them with the evaluation's detectors as ``duogen eval`` does: fidelity per picture, and
consistency over each pair of consecutive pictures of a turn, averaged per task, then over the tasks. A model drawing perfectly at that size scores this, no more. With
``--aligned``, the same for the folder's VAE round trip (encode, posterior mode, decode).

    python benchmarks/shapes_canvas_ceiling.py --sizes 64 96 128 --aligned duogen_agents/weights/shapes/aligned
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any


def ceiling(tasks: int, sizes: list[int], aligned: Path | None = None, seed: int = 0) -> list[dict[str, Any]]:
    import torch
    from PIL import Image

    from duogen_agents.training import stage2 as s2
    from duogen_agents.worlds import shapes as W

    vae = None
    if aligned is not None:
        vae, _, _, meta = s2.load_aligned(aligned)
        sizes = [int(meta["size"])]
    with tempfile.TemporaryDirectory(prefix="duogen-ceiling-") as tmp:
        W.write_dataset(Path(tmp), tasks, split="eval", seed=seed)
        turns: dict[tuple[str, int], list[tuple[int, Image.Image]]] = defaultdict(list)
        for path in sorted((Path(tmp) / "images").glob("*.png")):
            m = re.fullmatch(r"(.*)-t(\d+)-(\d+)\.png", path.name)
            assert m is not None, path.name
            turns[(m.group(1), int(m.group(2)))].append((int(m.group(3)), Image.open(path).convert("RGB")))
    rows = []
    for size in sizes:

        def at_size(image: Image.Image, size: int = size) -> Image.Image:
            x = s2.to_tensor(image, size)
            if vae is not None:
                with torch.no_grad():
                    x = vae.decode(vae.encode(x[None, :, None]).latent_dist.mode()).sample[0, :, 0]
            return s2.to_image(x).resize((W.CANVAS, W.CANVAS))

        fidelity: list[float] = []
        consistency: list[float] = []
        per_task: dict[str, list[float]] = defaultdict(list)
        for (task, _), pictures in turns.items():
            pictures.sort(key=lambda kv: kv[0])
            scenes = [W.detect(im).scene for _, im in pictures]  # the ground truth reads back exactly
            drawn = [at_size(im) for _, im in pictures]
            fidelity += [W.score_fidelity(d, s) for d, s in zip(drawn, scenes, strict=True)]
            for k in range(1, len(drawn)):
                value = W.score_consistency(drawn[k - 1], drawn[k], scenes[k - 1], scenes[k])
                if value is not None:
                    consistency.append(value)
                    per_task[task].append(value)
        by_task = [sum(v) / len(v) for v in per_task.values()]
        rows.append(
            {
                "size": size,
                "through": f"the VAE of {aligned}" if vae is not None else "scaling alone",
                "pictures": len(fidelity),
                "fidelity": round(sum(fidelity) / len(fidelity), 3),
                "pairs": len(consistency),
                "tasks with pairs": len(by_task),
                "consistency": round(sum(by_task) / len(by_task), 3) if by_task else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=48, help="held-out tasks (evaluation split)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--aligned", type=Path, help="also: through this aligned folder's VAE (at its size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for row in ceiling(args.tasks, args.sizes, seed=args.seed):
        print(json.dumps(row), flush=True)
    if args.aligned is not None:
        for row in ceiling(args.tasks, args.sizes, args.aligned, seed=args.seed):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
