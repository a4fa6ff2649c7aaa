"""Video2World: our pipeline (the VAE encodes only the conditioning frames) against diffusers' own
(it encodes the conditioning clip padded to the whole clip), in one run.

Two tables:
- FLOPs at a real picture size (default 704x1280), counted on the meta device (nothing is computed):
  the VAE encode, ours and diffusers', and for scale the VAE decode and the DiT calls of one draw
  (Cosmos-Predict2-2B shape, guidance's two calls per step), for 1 and 5 conditioning frames at
  3 and 28 frames ahead (28 is the presets' ``image.horizon_frames``).
- Wall time of one whole draw through each pipeline, alternating, with random weights: the real Wan
  VAE (base_dim 96) and a Cosmos DiT of ``--layers`` blocks at the 2B width, at ``--size``; and
  whether the two pictures are the same (on this project's CPU they are, and so are the latents:
  ``tests/test_image_families.py``; on an H200, 28 ahead with the VAE in tiles, the latents came out the
  same too, largest difference 0: README, "H200, 2026-11-28").

    python benchmarks/video2world_encode.py                         # CPU: 128x224, 2 blocks, 2 steps
    python benchmarks/video2world_encode.py --size 704x1280 --layers 28 --steps 2 --tiles   # GPU, real shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import cosmos_dit, cosmos_dit_inputs, cosmos_pipeline_modules, t5_xxl_encoder, wan_vae  # noqa: E402

from duogen_agents.models.images.cosmos2 import conditioning_frames  # noqa: E402
from duogen_agents.models.images.safety import PassThroughSafetyChecker  # noqa: E402
from duogen_agents.models.images.video2world import ConditioningVideo2World  # noqa: E402
from duogen_agents.models.loading import quiet_libraries  # noqa: E402

TEMPORAL = 4  # the Wan VAE packs four frames into one latent frame (after the first)


def flops(fn: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        fn()
    return counter.get_total_flops() / 1e12


def flop_table(height: int, width: int, steps: int) -> None:
    with torch.device("meta"):
        v, d = wan_vae(torch.float32), cosmos_dit(torch.float32, video2world=True)  # FLOPs: any dtype
    lh, lw = height // 8, width // 8
    print(f"TFLOP of one Video2World draw at {width}x{height}, {steps} steps with guidance (2 DiT calls a step)")
    print(
        f"{'cond':>4} {'ahead':>5} {'clip':>4} {'encode, diffusers':>18} {'encode, ours':>13} {'decode':>7} {'DiT':>8}  saved"
    )
    for cond in (1, 5):
        for ahead in (3, 28):
            frames, num_frames, _ = conditioning_frames([Image.new("RGB", (8, 8))] * cond, ahead, TEMPORAL)
            latent, kept = (num_frames - 1) // TEMPORAL + 1, len(frames)
            plain = flops(lambda n=num_frames: v.encode(torch.empty(1, 3, n, height, width, device="meta")))
            ours = flops(lambda n=kept: v.encode(torch.empty(1, 3, n, height, width, device="meta")))
            decode = flops(lambda n=latent: v.decode(torch.empty(1, 16, n, lh, lw, device="meta")))
            call = flops(lambda n=latent: d(**cosmos_dit_inputs(n, height, width, True, torch.float32)))
            whole = plain + decode + 2 * steps * call
            print(
                f"{len(frames):>4} {ahead:>5} {num_frames:>4} {plain:>18.1f} {ours:>13.1f} {decode:>7.1f} "
                f"{2 * steps * call:>8.0f}  {plain - ours:.1f} ({100 * (plain - ours) / whole:.1f}% of the draw)"
            )


def timing(args: argparse.Namespace) -> None:
    from diffusers import Cosmos2VideoToWorldPipeline

    from duogen_agents.models.tiny import _tiny_text_encoder

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    height, width = args.height, args.width
    torch.manual_seed(0)
    _, tokenizer = _tiny_text_encoder()
    with torch.device(device):  # T5-XXL's width, one layer (both pipelines encode the prompts alike)
        t5, vae, dit = t5_xxl_encoder(dtype, shrink=True), wan_vae(dtype), cosmos_dit(dtype, True, args.layers)
    modules = cosmos_pipeline_modules(t5, tokenizer, dit, vae, PassThroughSafetyChecker().to(device))
    if args.tiles:  # image.vae_tiling, as the 24 GB preset draws
        vae.enable_tiling()
    pipes = {"ours": ConditioningVideo2World(**modules), "diffusers": Cosmos2VideoToWorldPipeline(**modules)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)) for _ in range(args.cond)]
    frames, num_frames, index = conditioning_frames(refs, args.ahead, TEMPORAL)

    def draw(name: str, output_type: str = "np") -> tuple[float, Any, float]:
        """Seconds, the picture (or the latents), and on a GPU the GiB allocated at most beyond what
        was allocated before the call (the weights)."""
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = pipes[name](
            prompt="the pot, a moment later",
            video=frames,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type=output_type,
        )
        peak = 0.0
        if gpu:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30
        result = out.frames if output_type == "latent" else out.frames[0][index]
        return time.perf_counter() - t, result, peak

    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads, float32"
    print(
        f"\nOne Video2World draw at {width}x{height}: {len(frames)} conditioning frame(s), {args.ahead} ahead "
        f"({num_frames}-frame clip), {args.steps} steps, DiT of {args.layers} blocks, VAE "
        f"{'in tiles' if args.tiles else 'whole'}; {where}"
    )
    draw("ours"), draw("diffusers")  # warm-up
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    peaks: dict[str, float] = {}
    pictures: dict[str, np.ndarray] = {}
    for i in range(args.repeats):  # alternating, each first in turn
        for name in ("diffusers", "ours") if i % 2 == 0 else ("ours", "diffusers"):
            sec, pictures[name], peaks[name] = draw(name)
            times[name].append(sec)
    o, p = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"{'pipeline':>10} {'median (s)':>11} {'peak beyond weights (GiB)':>26}  runs")
    for name, med in (("diffusers", p), ("ours", o)):
        peak = f"{peaks[name]:26.2f}" if gpu else f"{'-':>26}"
        print(f"{name:>10} {med:>11.2f} {peak}  {', '.join(f'{s:.2f}' for s in times[name])}")
    same = np.array_equal(pictures["ours"], pictures["diffusers"])
    ours_l, plain_l = (draw(name, "latent")[1] for name in ("ours", "diffusers"))
    diff = (ours_l.float() - plain_l.float()).abs().max().item()
    print(
        f"ratio ours/diffusers {o / p:.2f}; the same picture: {same}; the same latents: "
        f"{torch.equal(ours_l, plain_l)} (largest difference {diff:.3g})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="128x224", help="HEIGHTxWIDTH of the timed draw")
    ap.add_argument("--flop-size", default="704x1280", help="HEIGHTxWIDTH of the FLOP table")
    ap.add_argument("--layers", type=int, default=2, help="DiT blocks of the timed draw (the 2B model has 28)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cond", type=int, default=1, choices=[1, 5], help="conditioning frames of the timed draw")
    ap.add_argument("--ahead", type=int, default=28, help="frames ahead of the timed draw")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each row (at least 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiles", action="store_true", help="the VAE in tiles (image.vae_tiling)")
    ap.add_argument("--no-flops", action="store_true")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    quiet_libraries()
    torch.set_num_threads(args.threads)
    args.height, args.width = (int(x) for x in args.size.split("x"))
    if not args.no_flops:
        fh, fw = (int(x) for x in args.flop_size.split("x"))
        flop_table(fh, fw, 20)
    timing(args)


if __name__ == "__main__":
    main()
