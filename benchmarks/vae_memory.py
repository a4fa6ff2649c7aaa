"""Memory of the Wan VAE (the Cosmos-Predict2 shape: base_dim 96, random weights) at a real picture
size, whole and in tiles (``image.vae_tiling``): what a decode (or encode) needs beyond its input.

Each case runs in a fresh process, so on a CPU the process's RSS high-water mark measures it (a GPU:
``torch.cuda.max_memory_allocated``). On this project's 2-core CPU a decode of one 704x1280 frame
takes about 2 minutes whole, 5 in tiles; two latent frames (a Video2World draw's five) about 10.

    python benchmarks/vae_memory.py --frames 1 2
    python benchmarks/vae_memory.py --what encode --frames 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def case(what: str, frames: int, tiled: bool, height: int, width: int, dtype: str, threads: int) -> dict:
    import resource

    import torch
    from overhead import wan_vae

    torch.set_num_threads(threads)
    gpu = torch.cuda.is_available()
    device, dt = ("cuda", getattr(torch, dtype)) if gpu else ("cpu", torch.float32)
    with torch.device(device):
        vae = wan_vae(dt)
    if tiled:
        vae.enable_tiling()
    shape = (1, 16, frames, height // 8, width // 8) if what == "decode" else (1, 3, frames, height, width)
    with torch.inference_mode():
        x = torch.randn(shape, device=device, dtype=dt)
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = time.perf_counter()
        y = vae.decode(x).sample if what == "decode" else vae.encode(x).latent_dist.mode()
        if gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        seconds = time.perf_counter() - t
    return {
        "beyond_input_gib": (peak - base) / 2**30,
        "seconds": seconds,
        "out": list(y.shape),
        "device": torch.cuda.get_device_name() if gpu else f"CPU, {threads} threads, float32",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["decode", "encode"], default="decode")
    ap.add_argument("--frames", type=int, nargs="+", default=[1], help="latent frames (decode) or frames (encode)")
    ap.add_argument("--height", type=int, default=704)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--dtype", default="bfloat16", help="on a GPU (a CPU runs float32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, in this process
    args = ap.parse_args()
    if args.case:
        what, frames, tiled = json.loads(args.case)
        print(json.dumps(case(what, frames, tiled, args.height, args.width, args.dtype, args.threads)))
        return
    print(f"Wan VAE (base_dim 96), {args.what}, {args.width}x{args.height}")
    print(f"{'frames':>6s} {'tiles':>6s} {'beyond input (GiB)':>19s} {'seconds':>8s}  device")
    for frames in args.frames:
        for tiled in (False, True):
            cmd = [sys.argv[0], *sys.argv[1:], "--case", json.dumps([args.what, frames, tiled])]
            out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            tiles = "yes" if tiled else "no"
            print(
                f"{frames:6d} {tiles:>6s} {r['beyond_input_gib']:19.2f} {r['seconds']:8.1f}  {r['device']}", flush=True
            )


if __name__ == "__main__":
    main()
