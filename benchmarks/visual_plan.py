"""A 4-image visual plan: ours against the raw sequential baseline doing the same work, in one run.

    python benchmarks/visual_plan.py --preset tiny          # CPU: the same code as on a GPU
    python benchmarks/visual_plan.py --real-shapes          # GPU: random weights at real sizes (7B-class
                                                            # Qwen2.5-VL, 2B Cosmos-Predict2, T5-XXL), a
                                                            # tokenizer of Qwen's vocabulary size (151k)
    python benchmarks/visual_plan.py --grammar              # grammar mask time per token, 151k vocabulary
    python benchmarks/visual_plan.py --session              # prefill tokens per action as a session grows

Ours: ``Agent.run(prompt, mode="visual-plan")`` (a 4-step plan, each step written and drawn), with
the planner's kept KV cache, grammar-constrained decoding and the image store. Baseline: the same
planner calls replayed with plain ``model.generate`` (full prefill each time, no grammar, the same
number of new tokens, greedy) and the same image requests as plain diffusers pipeline calls, one
after the other. Runs alternate (ours, baseline, ours, ...) and the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _home import scratch_home  # noqa: E402
from overhead import plain_inputs, plain_video2world  # noqa: E402

from duogen_agents.graphs import actions as A  # noqa: E402
from duogen_agents.models.images.cosmos2 import CosmosImageTool, conditioning_frames  # noqa: E402
from duogen_agents.models.loading import quiet_libraries  # noqa: E402
from duogen_agents.models.planner import TransformersPlanner  # noqa: E402
from duogen_agents.models.protocols import letterbox  # noqa: E402
from duogen_agents.presets import load_preset  # noqa: E402

PROMPT = "Plan a small balcony herb garden, step by step, with a picture of each step."


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Recorder:
    """Wraps the planner's ``generate`` and the tool's ``draw``: what each call did and its time."""

    def __init__(self, planner: TransformersPlanner, tool: Any) -> None:
        self.planner_calls: list[dict[str, Any]] = []
        self.draws: list[dict[str, Any]] = []
        gen, draw = planner.generate, tool.draw

        def generate(conversation: Any, schema: Any, **kw: Any) -> Any:
            _sync()
            t = time.perf_counter()
            out = gen(conversation, schema, **kw)
            _sync()
            self.planner_calls.append(
                dict(
                    conversation=conversation,
                    new=out.num_tokens,
                    forced=out.forced_tokens,
                    prompt=out.prompt_tokens,
                    prefill=out.prefill_tokens,
                    s=time.perf_counter() - t,
                )
            )
            return out

        def drawn(prompt: str, **kw: Any) -> Any:
            _sync()
            t = time.perf_counter()
            out = draw(prompt, **kw)
            _sync()
            self.draws.append(
                dict(
                    prompt=prompt,
                    kind=kw.get("kind", "generate"),
                    references=list(kw.get("references", ())),
                    seed=kw.get("seed", 0),
                    horizon=tool.spec.horizon_frames,
                    s=time.perf_counter() - t,
                    cache=(getattr(out, "details", None) or {}).get("first_block_cache"),
                )
            )
            return out

        planner.generate = generate  # type: ignore[method-assign]
        tool.draw = drawn  # type: ignore[method-assign]

    def reset(self) -> None:
        self.planner_calls.clear()
        self.draws.clear()


def _kind(draw: dict[str, Any]) -> str:
    refs = len(draw["references"])
    return "text-to-image" if not refs else f"video2world, {refs} earlier, {draw.get('horizon')} ahead"


def baseline(planner: TransformersPlanner, tool: CosmosImageTool, rec: Recorder, images: bool = True) -> dict[str, Any]:
    """The recorded work, done plainly: full prefill + ``generate`` per call, pipeline per image.
    ``draws``: (kind, seconds) per image."""
    if planner.residency_role is not None:  # offloaded: `generate` below does not load the planner itself
        from duogen_agents.models.residency import residency_for

        residency_for(planner.device).use(planner.residency_role)
    t_plan = 0.0
    for call in rec.planner_calls:
        _sync()
        t = time.perf_counter()
        enc = plain_inputs(planner, call["conversation"])
        with torch.inference_mode():
            planner.model.generate(
                **enc,
                max_new_tokens=call["new"],
                min_new_tokens=call["new"],
                do_sample=False,
                pad_token_id=planner.stop_token_ids[0],
            )
        _sync()
        t_plan += time.perf_counter() - t
    t_img = 0.0
    draws: list[tuple[str, float]] = []
    for d in rec.draws if images else []:
        _sync()
        t = time.perf_counter()
        kw = tool._common(d["prompt"], d["seed"], None)
        kw.pop("callback_on_step_end")
        if not d["references"]:
            tool.text2image(**kw)
        else:
            pipe = plain_video2world(tool)
            fitted = [letterbox(im, (tool.spec.width, tool.spec.height)) for im in d["references"]]
            frames, n_frames, _ = conditioning_frames(fitted, d["horizon"], pipe.vae_scale_factor_temporal)
            pipe(video=frames, num_frames=n_frames, fps=tool.spec.fps, **kw)
        _sync()
        draws.append((_kind(d), time.perf_counter() - t))
        t_img += draws[-1][1]
    return {"planner": t_plan, "image": t_img, "draws": draws}


def _draws(run: dict[str, Any]) -> str:
    """Each draw of a run, in order: a first draw at a new shape (the warm-up's) shows apart."""
    return ", ".join(f"{kind} {sec:.2f}" for kind, sec in run["draws"])


def per_kind(draws: list[tuple[str, float]]) -> dict[str, float]:
    kinds: dict[str, list[float]] = {}
    for kind, sec in draws:
        kinds.setdefault(kind, []).append(sec)
    return {k: statistics.median(v) for k, v in kinds.items()}


class _Clock:
    """CPU seconds spent in named parts of the planner's decode loop (wrapped from outside)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.n: dict[str, int] = {}

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t
                self.n[name] = self.n.get(name, 0) + 1

        return timed


def profile(planner: TransformersPlanner, tool: CosmosImageTool, new_tokens: int, repeats: int) -> None:
    """Where a planner call's time goes, against plain ``generate`` and a bare decode loop, and one
    image through our tool against the plain pipeline: the parts of the plan's ratios, on one card."""
    import xgrammar as xgr

    from duogen_agents.models import planner as planner_module
    from duogen_agents.models.decoding import fresh_cache

    picture = tool.draw("a terracotta pot of basil on a sunny balcony", seed=1).image
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You plan a balcony garden. " * 40}]},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image", "image": picture}]},
    ]
    schema = A.step_schema([], max_text=4000, max_prompt=1000, max_refs=0)
    gpu = plain_inputs(planner, conversation)
    n_prompt = int(gpu["input_ids"].shape[1])
    stop = planner.stop_token_ids[0]

    def plain(n: int) -> float:
        _sync()
        t = time.perf_counter()
        with torch.inference_mode():
            planner.model.generate(**gpu, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=stop)
        _sync()
        return time.perf_counter() - t

    def bare(n: int) -> float:  # prefill, then forward + argmax + .item() per token
        _sync()
        t = time.perf_counter()
        with torch.inference_mode():
            cache = fresh_cache(planner.model)
            out = planner.model(**gpu, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for _ in range(n - 1):
                token = int(out.logits[0, -1].argmax())
                out = planner.model(
                    input_ids=torch.tensor([[token]], device=planner.device),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        _sync()
        return time.perf_counter() - t

    def ours(n: int, grammar: bool) -> tuple[float, int]:
        planner.prefix_cache.forget()
        _sync()
        t = time.perf_counter()
        out = planner.generate(conversation, schema if grammar else None, max_new_tokens=n)
        _sync()
        return time.perf_counter() - t, out.num_tokens

    for f in (lambda: plain(4), lambda: bare(4), lambda: ours(4, False), lambda: ours(new_tokens, True)):
        f()  # warm-up
    rows: dict[str, list[float]] = {k: [] for k in ("plain 1", "plain N", "bare 1", "bare N", "ours 1", "ours N")}
    grammar_rows: list[tuple[float, int]] = []
    free_tokens = new_tokens
    for _ in range(repeats):
        rows["plain 1"].append(plain(1))
        rows["plain N"].append(plain(new_tokens))
        rows["bare 1"].append(bare(1))
        rows["bare N"].append(bare(new_tokens))
        rows["ours 1"].append(ours(1, False)[0])
        s_free, free_tokens = ours(new_tokens, False)
        rows["ours N"].append(s_free)
        grammar_rows.append(ours(new_tokens, True))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"\nplanner profile: prompt {n_prompt} tokens (one {picture.size[0]}x{picture.size[1]} picture), {repeats} repeats"
    )
    print(f"{'path':44s} {'first token (s)':>15s} {'per token (ms)':>15s}")
    for name, key in (
        ("plain generate (greedy, no grammar)", "plain"),
        ("bare loop (forward, argmax, item)", "bare"),
        ("ours, free text", "ours"),
    ):
        n = free_tokens if key == "ours" else new_tokens
        per = (med[f"{key} N"] - med[f"{key} 1"]) / max(n - 1, 1) * 1e3
        print(f"{name:44s} {med[f'{key} 1']:15.3f} {per:15.2f}")
    g_s = statistics.median(s for s, _ in grammar_rows)
    g_n = statistics.median(n for _, n in grammar_rows)
    print(
        f"{'ours, step schema':44s} {med['ours 1']:15.3f} {(g_s - med['ours 1']) / max(g_n - 1, 1) * 1e3:15.2f}  ({g_n} tokens)"
    )

    # Where the grammar call's time goes: CPU time in each part of the loop (wrapped from outside).
    clock = _Clock()
    saved = (planner._forward, planner_module.sample, planner_module.apply_bitmask, xgr.GrammarMatcher)

    class Matcher(xgr.GrammarMatcher):  # type: ignore[misc]
        fill_next_token_bitmask = clock.wrap("fill mask (xgrammar)", xgr.GrammarMatcher.fill_next_token_bitmask)
        accept_token = clock.wrap("accept token (xgrammar)", xgr.GrammarMatcher.accept_token)

    planner._forward = clock.wrap("forward launch", planner._forward)  # type: ignore[method-assign]
    planner_module.sample = clock.wrap("sample + wait for GPU", lambda *a: int(saved[1](*a)))
    planner_module.apply_bitmask = clock.wrap("apply mask", saved[2])
    xgr.GrammarMatcher = Matcher
    try:
        total, n = ours(new_tokens, True)
    finally:
        planner._forward, planner_module.sample, planner_module.apply_bitmask, xgr.GrammarMatcher = saved  # type: ignore[method-assign]
    print(f"one step-schema call, {n} tokens, {total:.3f} s; CPU time per part:")
    for name, s in sorted(clock.s.items(), key=lambda kv: -kv[1]):
        print(f"  {name:34s} {s:8.3f} s  {s / clock.n[name] * 1e3:8.3f} ms x {clock.n[name]}")
    print(f"  {'the rest':34s} {total - sum(clock.s.values()):8.3f} s")

    # One image: our tool's draw against the plain pipeline call, alternating.
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(repeats):
        for who in ("ours", "plain"):
            _sync()
            t = time.perf_counter()
            if who == "ours":
                tool.draw("a terracotta pot of basil", seed=2)
            else:
                kw = tool._common("a terracotta pot of basil", 2, None)
                kw.pop("callback_on_step_end")
                tool.text2image(**kw)
            _sync()
            times[who].append(time.perf_counter() - t)
    o, p = statistics.median(times["ours"]), statistics.median(times["plain"])
    print(
        f"one text-to-image draw, {tool.spec.steps} steps: ours {o:.3f} s, plain pipeline {p:.3f} s, ratio {o / p:.2f}"
    )


def components(args: argparse.Namespace, home: Path) -> tuple[TransformersPlanner, CosmosImageTool, Any]:
    if args.real_shapes:
        from _vocab import real_size_tokenizer
        from overhead import real_shape_components

        planner, tool, preset = real_shape_components(home, tokenizer=real_size_tokenizer())
        preset.planner.max_text_chars, preset.planner.max_prompt_chars = 120, 60
        # A random planner asks for "continue" often; 3 frames ahead keeps each Video2World call at
        # two latent frames (the default 28 frames ahead costs about 8 times a text-to-image call).
        preset.image.horizon_frames = 3
    else:
        preset = load_preset(args.preset)
        planner = TransformersPlanner.from_spec(preset.planner, home / "models")
        tool = CosmosImageTool.from_spec(preset.image, home / "models")
    preset.limits.max_images = 4
    preset.limits.plan_min_steps = preset.limits.plan_max_steps = 4
    preset.limits.max_actions = max(preset.limits.max_actions, 12)
    return planner, tool, preset


def run_plan(args: argparse.Namespace) -> None:
    from duogen_agents.agent import Agent

    home = scratch_home("duogen-bench-")
    planner, tool, preset = components(args, home)
    rec = Recorder(planner, tool)
    agent = Agent(preset, planner=planner, image_tool=tool, home=home)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {device}; planner {planner.source or preset.planner.model}, vocabulary {len(planner.tokenizer)}; "
        f"image {preset.image.width}x{preset.image.height}, {preset.image.steps} steps, guidance {preset.image.guidance}"
    )

    def ours() -> dict[str, Any]:
        rec.reset()
        _sync()
        t = time.perf_counter()
        doc = agent.run(PROMPT, mode="visual-plan", seed=args.seed)
        _sync()
        total = time.perf_counter() - t
        return {
            "total": total,
            "planner": sum(c["s"] for c in rec.planner_calls),
            "image": sum(d["s"] for d in rec.draws),
            "images": len(doc.images),
            "calls": len(rec.planner_calls),
            "new": [c["new"] for c in rec.planner_calls],
            "forced": [c["forced"] for c in rec.planner_calls],
            "prompt": [c["prompt"] for c in rec.planner_calls],
            "prefill": [c["prefill"] for c in rec.planner_calls],
            "draws": [(_kind(d), d["s"]) for d in rec.draws],
        }

    if args.profile:
        profile(planner, tool, args.profile, max(args.repeats, 1))
    t = time.perf_counter()
    first = ours()  # warm-up (compiles, first-use loads)
    print(f"warm-up run: {time.perf_counter() - t:.2f} s, {first['images']} images, {first['calls']} planner calls")
    mine: list[dict[str, Any]] = []
    base: list[dict[str, float]] = []
    for _ in range(max(args.repeats, 1)):  # --repeats 0: the baseline once, against the warm-up run
        if args.repeats:
            mine.append(ours())
        t = time.perf_counter()
        b = baseline(planner, tool, rec)
        b["total"] = time.perf_counter() - t
        base.append(b)
    mine = mine or [first]
    last = mine[-1]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(
        f"\n{args.repeats} alternating repeats, medians; {last['images']} images, {last['calls']} planner calls, "
        f"{sum(last['new'])} new planner tokens"
        + ("" if args.repeats else " (ours: the warm-up run, first use included)")
    )
    print(f"{'part':28s} {'ours (s)':>10s} {'baseline (s)':>13s} {'ratio':>7s}")
    for k, label in (("planner", "planner calls"), ("image", "image draws"), ("total", "whole plan")):
        o, b = med(mine, k), med(base, k)
        print(f"{label:28s} {o:10.2f} {b:13.2f} {o / b:7.2f}", flush=True)
    other = med(mine, "total") - med(mine, "planner") - med(mine, "image")
    print(f"{'graph, store, encoding':28s} {other:10.2f} {'-':>13s}")
    print(f"prompt tokens per call:  {last['prompt']}")
    print(f"prefill tokens per call: ours {last['prefill']}; baseline = prompt tokens")
    print(f"new tokens per call:     {last['new']}")
    print(f"of which forced (entered by jump forward, no decode step each): {last['forced']}")
    print(f"seconds per draw, in order: ours {_draws(last)}; baseline {_draws(base[-1])}")
    print(f"peak memory: {_peak_gb():.2f} GiB ({'GPU, allocated' if torch.cuda.is_available() else 'process RSS'})")
    base_kinds = per_kind([d for b in base for d in b["draws"]])

    def by_kind(rows: list[dict[str, Any]]) -> None:
        """Seconds per image by kind (a random planner's plans differ between runs, so the whole-plan
        ratio of a variant compares different work; per kind and per token they compare alike)."""
        mine_kinds = per_kind([d for r in rows for d in r["draws"]])
        for kind, sec in sorted(mine_kinds.items()):
            b = base_kinds.get(kind)
            ratio = f"{sec / b:7.2f}" if b else f"{'-':>7s}"
            print(f"{'  one ' + kind:28s} {sec:10.2f} {b if b else float('nan'):13.2f} {ratio}")

    by_kind(mine)

    def variant(name: str, repeats: int) -> None:
        t = time.perf_counter()
        try:
            warm = ours()
            print(f"\n{name}: warm-up run {time.perf_counter() - t:.2f} s (compilation included)", flush=True)
            rows = [ours() for _ in range(repeats)] or [warm]
        except Exception as e:  # report and go on to the next variant
            print(f"\n{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            return
        for k, label in (("planner", "planner calls"), ("image", "image draws"), ("total", "whole plan")):
            o, b = med(rows, k), med(base, k)
            print(f"{label:28s} {o:10.2f} {b:13.2f} {o / b:7.2f}", flush=True)
        by_kind(rows)
        print(f"new tokens per call: {rows[-1]['new']}; forced: {rows[-1]['forced']}")
        print(f"seconds per draw, in order: {_draws(rows[-1])}")
        # The same planner calls done plainly (plain generate is not compiled by the variants).
        same = baseline(planner, tool, rec, images=False)["planner"]
        o = rows[-1]["planner"]
        print(
            f"{'planner, same calls':28s} {o:10.2f} {same:13.2f} {o / same:7.2f}  ({sum(rows[-1]['new'])} new tokens)"
        )

    # Offloaded first (eager, as the 24 GB preset runs; then, with --offload-compile, compiled as well:
    # the arena keeps the planner's addresses for its CUDA graphs), then every model resident again.
    if args.offload or args.offload_compile:
        from duogen_agents.models.images import compile_dit, vae_tiling
        from duogen_agents.models.residency import offload_image_tool, offload_planner, residency_for

        planner.prefix_cache.forget()  # the earlier runs' kept KV caches: a fresh process has none
        offload_planner(planner)
        offload_image_tool(tool)
        # As the 24 GB preset draws: its VAE in tiles (image.vae_tiling); and --offload-horizon frames
        # ahead (the preset's 28 by default: the Video2World draws it makes, which set its peak).
        mode = load_preset("qwen2.5-vl-7b+cosmos2-2b-24gb").image
        horizon, tool.spec.horizon_frames = tool.spec.horizon_frames, args.offload_horizon or mode.horizon_frames
        vae_tiling(tool.text2image.vae, mode.vae_tiling)
        tiles = ", the VAE in tiles" if mode.vae_tiling else ""
        was_compiled = planner.spec.compile
        runs = [("", False)] if args.offload else []
        if args.offload_compile:
            runs.append((", compiled (DiT regional, planner decode with CUDA graphs)", True))
        for what, compiled in runs:
            if compiled:
                res = residency_for(planner.device)
                for pipe, role in ((tool.text2image, "text2image"), (tool.video2world, "video2world")):
                    res.use(f"{role}:{id(tool)}")  # compile_dit compiles a DiT whose weights are on the GPU
                    compile_dit(pipe.transformer)
                planner.spec.compile = True
                planner.prefix_cache.forget()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            variant(
                f"ours, offloaded{what} (one model on the GPU at a time{tiles}; {tool.spec.horizon_frames} frames ahead)",
                args.variant_repeats,
            )
            if torch.cuda.is_available():
                print(
                    f"offloaded peak: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                    f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved (CUDA context not included); "
                    f"arena {residency_for(planner.device).arena_bytes() / 2**30:.2f} GiB",
                    flush=True,
                )
        tool.spec.horizon_frames = horizon
        if not tool.spec.vae_tiling:
            tool.text2image.vae.disable_tiling()
        residency_for(planner.device).release()
        planner.residency_role = tool.residency = None
        if args.offload_compile:  # the later variants decode as they say (the DiT stays compiled)
            planner.spec.compile = was_compiled
            planner.prefix_cache.forget()
    # Variants after the baseline, which stays plain. Compiled parts compile once per process.
    if args.compile_dit or args.compile_planner:
        if args.compile_dit:
            from duogen_agents.models.images import compile_dit

            for pipe in (tool.text2image, tool.video2world):
                compile_dit(pipe.transformer)
        if args.compile_planner:
            planner.spec.compile = True
        parts = " and ".join(
            p
            for p, on in (
                ("DiT (regional)", args.compile_dit),
                ("planner decode (static cache, CUDA graphs)", args.compile_planner),
            )
            if on
        )
        # Its warm-up run compiles, so it is timed again at least once whatever --variant-repeats says.
        variant(f"ours, compiled {parts}", max(args.variant_repeats, 1))
    if args.no_jump:
        planner.spec.jump_forward = False
        also = " (and compiled as above)" if args.compile_dit or args.compile_planner or args.offload_compile else ""
        variant(f"ours, jump forward off (every token a decode step){also}", args.variant_repeats)
        planner.spec.jump_forward = True
    if args.first_block_cache > 0:
        from duogen_agents.models.images import first_block_cache

        for pipe in (tool.text2image, tool.video2world):
            first_block_cache(pipe.transformer, args.first_block_cache)
        also = " (and compiled as above)" if args.compile_dit or args.compile_planner or args.offload_compile else ""
        variant(f"ours, first-block cache at {args.first_block_cache}{also}", args.variant_repeats)
        stats = [d["cache"] for d in rec.draws if d.get("cache")]  # rec holds the last run's draws
        done, skipped = sum(c["computed"] for c in stats), sum(c["skipped"] for c in stats)
        print(f"DiT calls of the last run: {done} every block, {skipped} the first block only")
        from duogen_agents.models.images.step_cache import FirstBlockCache

        for pipe in (tool.text2image, tool.video2world):  # the variants after this one run without it
            FirstBlockCache.detach(pipe.transformer)


def run_session(args: argparse.Namespace) -> None:
    """Prefill tokens per planner call at turns 1, 5 and 10 of one session, with and without reuse."""
    from duogen_agents.agent import Agent

    home = scratch_home("duogen-bench-")
    preset = load_preset(args.preset)
    planner = TransformersPlanner.from_spec(preset.planner, home / "models")
    tool = CosmosImageTool.from_spec(preset.image, home / "models")
    rec = Recorder(planner, tool)
    agent = Agent(preset, planner=planner, image_tool=tool, home=home)
    session = agent.session("bench")
    print(
        f"{'turn':>4s} {'calls':>5s} {'prompt tokens (mean)':>21s} {'prefilled (mean)':>17s} {'first call prefilled':>21s}"
    )
    for turn in range(1, 11):
        rec.reset()
        session.send(f"Turn {turn}: add one more step to the garden plan.", mode="interleaved", seed=turn)
        calls = rec.planner_calls
        if turn in (1, 5, 10) or args.verbose:
            print(
                f"{turn:4d} {len(calls):5d} {statistics.mean(c['prompt'] for c in calls):21.0f} "
                f"{statistics.mean(c['prefill'] for c in calls):17.0f} {calls[0]['prefill']:21d}"
            )


def run_encode(args: argparse.Namespace) -> None:
    """CPU time of ``encode`` per planner call as a session gains pictures of the real size (704x1280,
    the 7B preset's max_pixels): every picture processed again (``reuse=False``, as before) against
    the piece cache (each picture once)."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    home = scratch_home("duogen-bench-")
    planner = TransformersPlanner.from_spec(load_preset("tiny").planner, home / "models")
    real = load_preset("qwen2.5-vl-7b+cosmos2-2b")
    planner.processor.image_processor = Qwen2VLImageProcessor(max_pixels=real.planner.max_pixels)
    gen = torch.Generator().manual_seed(0)

    def picture() -> Image.Image:
        pixels = torch.randint(0, 256, (real.image.height, real.image.width, 3), generator=gen, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy())

    conv: list[dict[str, Any]] = [{"role": "system", "content": [{"type": "text", "text": "You plan."}]}]
    print(f"encode per planner call, {real.image.width}x{real.image.height} pictures, {args.repeats} repeats (medians)")
    print(f"{'pictures so far':>15s} {'every picture (ms)':>19s} {'piece cache (ms)':>17s}")
    for n in range(1, 9):
        conv.append(
            {"role": "user", "content": [{"type": "text", "text": f"Step {n}."}, {"type": "image", "image": picture()}]}
        )
        conv.append({"role": "assistant", "content": [{"type": "text", "text": f"Drawn step {n}."}]})
        planner.encode(conv)  # the new picture processed once, as the call that drew it would
        cold, warm = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            planner.encode(conv, reuse=False)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            planner.encode(conv)
            warm.append(time.perf_counter() - t)
        if n in (1, 2, 4, 8):
            print(f"{n:15d} {statistics.median(cold) * 1e3:19.1f} {statistics.median(warm) * 1e3:17.1f}", flush=True)


def _probe_vocabulary() -> tuple[Any, dict[str, int]]:
    """The vocabulary of ``shared/probes/xgrammar_mask_cost.py``: 151k random word pieces, a tenth of
    them glued to JSON punctuation (harder for xgrammar than a vocabulary of mostly words)."""
    import random
    import string

    import xgrammar as xgr

    rng = random.Random(0)
    pieces: set[str] = set()
    lengths = [1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 10, 12]
    while len(pieces) < 151_000:
        w = "".join(rng.choice(string.ascii_letters) for _ in range(rng.choice(lengths)))
        glue = ['"', '",', '":', "{", "}", ": "]
        pieces.add(rng.choice(["", " "]) + w if rng.random() < 0.9 else w + rng.choice(glue))
    vocab = sorted(pieces) + ['"', "{", "}", ":", ",", "[", "]", " ", "\n"] + [str(d) for d in range(10)]
    vocab += [c for c in string.printable if c not in vocab and c not in "\r\x0b\x0c"]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=[0])
    return info, {v: i for i, v in enumerate(vocab)}


def run_grammar(args: argparse.Namespace) -> None:
    """xgrammar mask time per token with a 151k vocabulary: the old bounded-repeat strings against
    the current ``+`` strings (their length enforced while decoding), on the step action of a real
    preset (800-character text, 300-character prompt)."""
    import xgrammar as xgr
    from _vocab import real_size_tokenizer

    from duogen_agents.models.decoding import split_limits

    refs = ["0123456789ab", "ba9876543210"]
    now = A.step_schema(refs, max_text=800, max_prompt=300, max_refs=2)

    def bounded(node: Any) -> Any:  # the schema as it was: pattern {1,N}, no maxLength
        if isinstance(node, list):
            return [bounded(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: bounded(v) for k, v in node.items()}
        if "maxLength" in out and out.get("pattern", "").endswith("+$"):
            out["pattern"] = out["pattern"][:-2] + "{{1,{}}}$".format(out.pop("maxLength"))
        return out

    target = json.dumps(
        {
            "text": "Fill the pot with fresh soil, then water it well until it drains.",
            "image": {
                "prompt": "a terracotta pot of basil on a sunny balcony",
                "references": [refs[0]],
                "kind": "continue",
            },
        }
    )
    tok = real_size_tokenizer()
    bpe = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=152064, stop_token_ids=[tok.eos_token_id])
    probe, index = _probe_vocabulary()
    vocabularies = [
        (f"byte-level BPE, {len(tok)} tokens", bpe, tok(target, add_special_tokens=False)["input_ids"]),
        (f"probe vocabulary, {probe.vocab_size} tokens", probe, [index[c] for c in target]),
    ]
    print(f"step action of {len(target)} characters; CPU threads {torch.get_num_threads()}; {args.repeats} passes")
    print(f"{'vocabulary':34s} {'schema':22s} {'compile (s)':>11s} {'mask median (ms)':>17s} {'p90 (ms)':>9s}")
    for vname, info, ids in vocabularies:
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        for name, schema in (("before: {1,N}", bounded(now)), ("now: + and maxLength", split_limits(now)[0])):
            t = time.perf_counter()
            compiler = xgr.GrammarCompiler(info, cache_enabled=False)
            grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            compile_s = time.perf_counter() - t
            times = []
            for _ in range(args.repeats):
                matcher = xgr.GrammarMatcher(grammar)
                for i in ids:
                    t = time.perf_counter()
                    matcher.fill_next_token_bitmask(bitmask)
                    times.append(time.perf_counter() - t)
                    assert matcher.accept_token(i), i
            times.sort()
            med, p90 = times[len(times) // 2] * 1e3, times[int(len(times) * 0.9)] * 1e3
            print(f"{vname:34s} {name:22s} {compile_s:11.2f} {med:17.3f} {p90:9.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--real-shapes", action="store_true")
    ap.add_argument("--compile-dit", action="store_true", help="then: regional torch.compile of the DiT blocks")
    ap.add_argument("--compile-planner", action="store_true", help="then: static KV cache + compiled decode step")
    ap.add_argument("--no-jump", action="store_true", help="then: planner.jump_forward off")
    ap.add_argument(
        "--first-block-cache", type=float, default=0.0, metavar="T", help="then: First Block Cache at threshold T"
    )
    ap.add_argument("--offload", action="store_true", help="then: only the running model on the GPU")
    ap.add_argument(
        "--offload-compile",
        action="store_true",
        help="then: offloaded with the planner's CUDA-graph decode and the DiT compiled (after --offload's run)",
    )
    ap.add_argument(
        "--offload-horizon",
        type=int,
        default=0,
        metavar="N",
        help="the offloaded run's Video2World frames ahead (default: the 24 GB preset's)",
    )
    ap.add_argument(
        "--variant-repeats",
        type=int,
        default=1,
        help="timed runs per variant after its warm-up run (0: the warm-up run is the timing; the compiled variant always at least 1)",
    )
    ap.add_argument("--grammar", action="store_true")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="TOKENS",
        help="first: where a planner call's time goes (TOKENS new tokens) and one image, ours vs plain",
    )
    ap.add_argument("--session", action="store_true")
    ap.add_argument("--encode", action="store_true", help="encode's CPU time per call, pictures reused or not")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    if args.grammar:
        run_grammar(args)
    elif args.session:
        run_session(args)
    elif args.encode:
        run_encode(args)
    else:
        run_plan(args)


if __name__ == "__main__":
    main()
