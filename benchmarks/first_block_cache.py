"""First Block Cache (``image.first_block_cache``) on a trained DiT: seconds per picture and DiT calls
skipped, against the same preset without the cache, in one run, alternating task by task.

    python benchmarks/first_block_cache.py                        # shapes preset, 12 held-out tasks
    python benchmarks/first_block_cache.py --thresholds 0.05 0.1 0.2 --tasks 48

The shapes preset's aligned DiT is the one trained DiT this project can run offline, so it is the one
where the skip rate means something (a random DiT's residuals change arbitrarily between steps). Each
threshold's agent answers the same held-out tasks of ``duogen eval --bench shapes`` with the same seed
as the uncached agent, right after it; the table gives the median seconds per picture, the share of DiT
calls that ran the first block only, and how far the pictures moved: the mean absolute pixel
difference (0-255) from the uncached picture for the same request, over the pictures whose prompt,
kind and number of references matched (a later picture's references are themselves drawn with the
cache, so its difference includes theirs). Quality is ``duogen eval``'s to measure (README).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np


def timed_tool(agent: Any) -> list[dict[str, Any]]:
    """Wrap the agent's image tool: each draw's seconds, request and cache counts are recorded."""
    tool = agent.renderer.tool
    draw, log = tool.draw, []

    def drawn(prompt: str, **kw: Any) -> Any:
        t = time.perf_counter()
        out = draw(prompt, **kw)
        log.append(
            dict(
                s=time.perf_counter() - t,
                key=(prompt, kw.get("kind"), len(kw.get("references", ()))),
                image=np.asarray(out.image, dtype=np.float32),
                cache=out.details.get("first_block_cache"),
            )
        )
        return out

    tool.draw = drawn
    return log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="shapes")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--tasks", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from _home import scratch_home

    from duogen_agents.agent import Agent
    from duogen_agents.eval.runner import _answer
    from duogen_agents.eval.tasks import load_bench
    from duogen_agents.presets import load_preset

    torch.set_num_threads(args.threads)
    base = load_preset(args.preset)
    if base.image.family not in ("aligned", "cosmos2"):
        raise SystemExit(f"{args.preset}: the first-block cache applies to the aligned and cosmos2 families")
    home = scratch_home("duogen-fbc-")
    names = ["off"] + [f"{t:g}" for t in args.thresholds]
    agents, logs = {}, {}
    for name, t in zip(names, [0.0, *args.thresholds], strict=True):
        preset = base.model_copy(deep=True)
        preset.image.first_block_cache = t
        agents[name] = Agent.from_preset(preset, home=home / name)
        logs[name] = timed_tool(agents[name])
    _, tasks, _ = load_bench("shapes", limit=args.tasks, seed=args.seed)
    print(
        f"preset {base.name}: {base.image.family} DiT, {base.image.steps} steps, strength {base.image.strength}; "
        f"{len(tasks)} tasks, threads {args.threads}"
    )
    for task in tasks:  # alternating: every agent answers a task before the next task
        for name in names:
            _answer(agents[name], task, args.seed)

    off = logs["off"]
    ref = {}
    for d in off:
        ref.setdefault(d["key"], d["image"])
    base_s = statistics.median(d["s"] for d in off)
    print(
        f"\n{'threshold':>10s} {'pictures':>9s} {'s/picture':>10s} {'ratio':>6s} {'skipped':>8s} {'moved (0-255)':>14s}"
    )
    for name in names:
        rows = logs[name]
        sec = statistics.median(d["s"] for d in rows)
        stats = [d["cache"] for d in rows if d["cache"]]
        calls = sum(c["computed"] + c["skipped"] for c in stats)
        skipped = f"{sum(c['skipped'] for c in stats) / calls:8.2f}" if calls else f"{'-':>8s}"
        moved = [float(np.abs(d["image"] - ref[d["key"]]).mean()) for d in rows if d["key"] in ref]
        mv = f"{statistics.mean(moved):7.2f} ({len(moved)})" if moved and name != "off" else f"{'-':>14s}"
        print(f"{name:>10s} {len(rows):9d} {sec:10.4f} {sec / base_s:6.2f} {skipped} {mv:>14s}")


if __name__ == "__main__":
    main()
