"""Guidance in one batch (``image.cfg_batch``): one picture with the DiT's two calls per step as one
batch, against the same tool unbatched and the plain diffusers pipeline, alternating, in one run.

    python benchmarks/cfg_batch.py                          # tiny preset, CPU
    python benchmarks/cfg_batch.py --real-shapes            # GPU: Cosmos-Predict2 2B shapes, 704x1280,
                                                            # random weights (BENCH_STEPS steps, default 20)
    python benchmarks/cfg_batch.py --real-shapes --compile  # the DiT's blocks compiled, in every column

Rows: Text2Image, and Video2World with one reference ``--horizon`` frames ahead. Columns: seconds per
picture (median of ``--repeats``), the peak memory of the draw beyond what was allocated before it (GPU
only), and the largest pixel difference between the batched and the unbatched picture (0-255).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import scratch_home  # noqa: E402
from overhead import plain_video2world  # noqa: E402

from duogen_agents.models.images.cosmos2 import CosmosImageTool, conditioning_frames  # noqa: E402
from duogen_agents.models.loading import quiet_libraries  # noqa: E402
from duogen_agents.models.protocols import letterbox  # noqa: E402
from duogen_agents.presets import load_preset  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tool(args: argparse.Namespace) -> CosmosImageTool:
    if args.real_shapes:
        from overhead import real_shape_image_tool

        preset = load_preset("qwen2.5-vl-7b+cosmos2-2b")
        spec = preset.image
        spec.steps = int(os.environ.get("BENCH_STEPS", "20"))
        spec.safety_checker, spec.compile, spec.references = "none", False, None
        if os.environ.get("BENCH_SHRINK") == "1":  # a dry run of this path on a CPU
            spec.height, spec.width, spec.steps = 64, 112, 2
        tool = real_shape_image_tool(preset)
    else:
        spec = load_preset(args.preset).image.model_copy(update={"references": None})
        tool = CosmosImageTool.from_spec(spec, scratch_home() / "models")
    tool.spec.horizon_frames = args.horizon
    if args.compile:
        from duogen_agents.models.images import compile_dit

        for pipe in (tool.text2image, tool.video2world):
            if not compile_dit(pipe.transformer):
                print("--compile: the DiT stays eager off a GPU")
                break
    return tool


def _timed(fn: Any) -> tuple[float, float, Any]:
    """Seconds, peak GiB beyond what was allocated before (GPU; NaN elsewhere), the result."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    sec = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if torch.cuda.is_available() else float("nan")
    return sec, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--real-shapes", action="store_true")
    ap.add_argument("--compile", action="store_true", help="the DiT's blocks compiled (GPU), in every column")
    ap.add_argument("--horizon", type=int, default=3, help="Video2World: frames ahead of the reference")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    tool = _tool(args)
    spec = tool.spec
    if spec.guidance <= 1:
        sys.exit(f"{args.preset}: guidance {spec.guidance} runs one DiT call per step; nothing to batch")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; {spec.width}x{spec.height}, {spec.steps} steps, guidance {spec.guidance}")
    reference = tool.draw("a balcony with pots", seed=1).image
    size = (spec.width, spec.height)

    def plain_t2i() -> Any:
        return tool.text2image(**tool._common("a pot of basil", 7, None)).images[0]

    def plain_v2w() -> Any:
        pipe = plain_video2world(tool)
        frames, n, index = conditioning_frames([letterbox(reference, size)], spec.horizon_frames, 4)
        return pipe(video=frames, num_frames=n, fps=spec.fps, **tool._common("a pot of basil", 7, None)).frames[0][
            index
        ]

    def ours(batched: bool, refs: list[Any]) -> Any:
        def draw() -> Any:
            spec.cfg_batch = batched
            kind = "continue" if refs else "generate"
            return tool.draw("a pot of basil", kind=kind, references=refs, seed=7)

        return draw

    print(f"{'picture':14s} {'plain (s)':>10s} {'ours (s)':>10s} {'batched (s)':>12s} {'ratio':>7s} "
          f"{'peak plain/ours/batched (GiB)':>31s} {'max px diff':>12s}")  # fmt: skip
    for name, plain, refs in (("text2image", plain_t2i, []), ("video2world", plain_v2w, [reference])):
        runs: dict[str, list[tuple[float, float, Any]]] = {"plain": [], "ours": [], "batched": []}
        columns = (("plain", plain), ("ours", ours(False, refs)), ("batched", ours(True, refs)))
        for _, fn in columns:
            fn()  # warm-up (and compilation) for each column
        for _ in range(args.repeats):
            for column, fn in columns:
                runs[column].append(_timed(fn))
        sec = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        peak = {k: max(r[1] for r in v) for k, v in runs.items()}
        a, b = runs["ours"][-1][2], runs["batched"][-1][2]
        assert b.details["cfg_batch"]["unpaired"] == 0, b.details
        diff = np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16)).max()
        peaks = "/".join(f"{peak[k]:.2f}" for k in ("plain", "ours", "batched"))
        print(
            f"{name:14s} {sec['plain']:10.3f} {sec['ours']:10.3f} {sec['batched']:12.3f} "
            f"{sec['batched'] / sec['ours']:7.2f} {peaks:>31s} {int(diff):12d}",
            flush=True,
        )
    print("ratio: batched over ours unbatched (below 1: batching is faster)")


if __name__ == "__main__":
    main()
