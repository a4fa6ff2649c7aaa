"""Issue #10 diagnostic: can stage 2's image side draw the shapes world from a perfect context?

Trains stage 2's VAE and DiT exactly as ``duogen train stage2`` does, with the same classes and
configs, Video2World inputs, flow-matching objective and Euler sampler
(``duogen_agents.training.stage2``). The DiT's context is an **oracle** instead of the planner's
states: nine tokens, one per cell, each the sum of learned embeddings of the cell, the shape and the
colour the target scene has there.

The pairs are shapes scenes from the training split: a scene before one change (add, move, recolour,
remove) as the conditioning frame, or a blank frame for 30% of them, and the scene after it. It
prints three things:

- the VAE's ceiling: the alignment of its reconstructions of held-out scenes;
- alignment, fidelity and consistency of sampled pictures on held-out compositions, every
  ``--eval-every`` steps, with the shapes detectors;
- a table at the end.

If the oracle cannot reach the bar (0.9), planner states will not either.

    python benchmarks/shapes_oracle_dit.py --out runs/oracle --vae-steps 2000 --dit-steps 6000
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any


def build_oracle(dim: int) -> Any:
    import torch

    from duogen_agents.worlds import shapes as W

    class Oracle(torch.nn.Module):
        """[B, 9] scene ids (0: empty, else 1 + shape * colours + colour) -> [B, 9, dim] context."""

        def __init__(self) -> None:
            super().__init__()
            self.shape = torch.nn.Embedding(len(W.SHAPES) + 1, dim)
            self.color = torch.nn.Embedding(len(W.COLORS) + 1, dim)
            self.cell = torch.nn.Parameter(torch.randn(9, dim) * 0.02)

        def forward(self, ids: Any, mask: Any = None) -> Any:  # every cell token is real
            ids = ids.long()
            empty = ids == 0
            shape = torch.where(empty, 0, (ids - 1) // len(W.COLORS) + 1)
            color = torch.where(empty, 0, (ids - 1) % len(W.COLORS) + 1)
            return self.shape(shape) + self.color(color) + self.cell

    return Oracle()


def scene_ids(scene: dict[str, Any]) -> Any:
    import torch

    from duogen_agents.worlds import shapes as W

    ids = []
    for cell in W.CELLS:
        if cell in scene:
            shape, color = scene[cell]
            ids.append(1 + W.SHAPES.index(shape) * len(W.COLORS) + list(W.COLORS).index(color))
        else:
            ids.append(0)
    return torch.tensor(ids)


def pairs(n: int, split: str, seed: int) -> list[tuple[Any, Any]]:
    from duogen_agents.worlds import shapes as W

    rng = random.Random(f"oracle-{split}-{seed}")
    out = []
    for _ in range(n):
        start = W._random_scene(rng, split, rng.randint(0, 3))
        if rng.random() < 0.3 or not start:
            out.append((None, start or W._random_scene(rng, split, rng.randint(1, 3))))
        else:
            out.append((start, W._change(rng, start, split)[0]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--dit-steps", type=int, default=6000)
    p.add_argument("--dit-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval", type=int, default=48, help="held-out pairs sampled at each evaluation")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--no-frames", action="store_true", help="withhold the earlier picture (blank frame)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from duogen_agents.training import stage2 as s2
    from duogen_agents.worlds import shapes as W

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    size, t0 = args.size, time.time()
    frames = not args.no_frames

    def render(scene: Any) -> Any:
        return W.render(scene, size) if scene is not None else None

    train = pairs(args.examples, "train", args.seed)
    held_out = pairs(args.eval, "eval", args.seed)
    clips = torch.stack([s2.clip_of(render(a), render(b), size) for a, b in train])
    ids = torch.stack([scene_ids(b) for _, b in train])

    # ---- the VAE (stage 2's loss: ink ten times the canvas) ------------------------------------------
    vae = s2.new_vae()
    pictures = torch.cat([clips[:, :, :1], clips[:, :, 1:]])
    weights = 1.0 + 9.0 * ((pictures - 1.0).abs().amax(dim=1, keepdim=True) > 0.2).float()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / max(1, args.vae_steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(pictures), (args.vae_batch,), generator=gen)
        x, w = pictures[idx], weights[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (w * (recon - x) ** 2).sum() / (w.sum() * 3) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"vae step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        raw = torch.cat([s2.encode_frames(vae, clips[i : i + 64]) for i in range(0, len(clips), 64)])
        mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4)) + 1e-6
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        latents = s2._normalise(vae, raw)
        if not frames:
            blank = s2._normalise(vae, s2.encode_frames(vae, s2.clip_of(None, W.render({}, size), size)[None]))
            latents[:, :, :1] = blank[:, :, :1]
        ceiling = []
        for _, b in held_out:
            x = s2.to_tensor(W.render(b, size), size).view(1, 3, 1, size, size)
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample[0, :, 0]
            ceiling.append(W.score_alignment(s2.to_image(rec).resize((W.CANVAS, W.CANVAS)), b))
    vae_ceiling = sum(ceiling) / len(ceiling)
    print(json.dumps({"vae_ceiling_alignment": round(vae_ceiling, 3)}), flush=True)
    vae.save_pretrained(args.out / "vae")  # reusable: duogen train stage2 --vae-from OUT
    if args.dit_steps == 0:
        return 0

    # ---- the DiT with the oracle context ----------------------------------------------------------------
    oracle = build_oracle(64)
    dit = s2.new_transformer(64)
    params = list(dit.parameters()) + list(oracle.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def dit_factor(s: int) -> float:  # warm-up, then cosine decay to a tenth
        import math

        return min(1.0, (s + 1) / 300) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.dit_steps)))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, dit_factor)
    rows: list[dict[str, Any]] = []
    for step in range(1, args.dit_steps + 1):
        idx = torch.randint(0, len(latents), (args.dit_batch,), generator=gen)
        z = latents[idx]
        t = torch.sigmoid(torch.randn(len(idx), generator=gen))
        noise = torch.randn(z[:, :, 1:].shape, generator=gen)
        hidden, timestep, mask = s2.dit_inputs(z, t, noise)
        pred = s2.dit_forward(dit, hidden, timestep, mask, oracle(ids[idx]), size)[:, :, 1:]
        loss = torch.nn.functional.mse_loss(pred, noise - z[:, :, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"dit step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.dit_steps:
            dit.eval()
            alignment, fidelity, consistency = [], [], []
            for k, (a, b) in enumerate(held_out):
                reference = render(a) if frames else None
                with torch.no_grad():
                    image = s2.sample(dit, vae, oracle, scene_ids(b), reference, size=size, steps=20, seed=k)
                big = image.resize((W.CANVAS, W.CANVAS))
                alignment.append(W.score_alignment(big, b))
                fidelity.append(W.score_fidelity(big, b))
                if a is not None and (c := W.score_consistency(W.render(a), big, a, b)) is not None:
                    consistency.append(c)
                if step == args.dit_steps and k < 8:
                    image.save(args.out / f"sample-{k}.png")
            dit.train()
            row = {"step": step, "alignment": round(sum(alignment) / len(alignment), 3),
                   "fidelity": round(sum(fidelity) / len(fidelity), 3),
                   "consistency": round(sum(consistency) / max(1, len(consistency)), 3),
                   "elapsed_s": round(time.time() - t0)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps({"vae_ceiling_alignment": vae_ceiling, "rows": rows}))
    print(f"oracle context, {'frames' if frames else 'no frames'}, {size}x{size}:")
    print("| DiT steps | alignment | fidelity | consistency |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['alignment']:.2f} | {r['fidelity']:.2f} | {r['consistency']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
