"""What both training stages share: seeding, checkpoints with ``--resume``, metrics and the loss plot.

The loops are short plain PyTorch loops rather than ``transformers.Trainer``: the planner's examples
are single conversations with their own images (batching them means padding 3-D positions and
pixel rows, which the Trainer's collators do not do for Qwen-VL), and stage 2 trains modules that are
not a ``PreTrainedModel``. A plain loop keeps each step visible: one forward per example, gradient
accumulation over ``batch`` examples, AdamW, linear warm-up then cosine decay.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from duogen_agents.errors import ConfigError

# AdamW moves each weight by about lr a step: far below this nothing trains any more, and near
# float32's limit its step overflows (an internal error, not a loss that shows it).
MAX_LR = 1e6


class TrainingDivergedError(ConfigError):
    """The loss (or the gradients, or the weights) stopped being finite: the learning rate is too high."""


@dataclass
class TrainConfig:
    steps: int = 200
    batch: int = 4  # examples per optimizer step (accumulated)
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 50
    log_every: int = 1

    def check(self, flags: Mapping[str, str] | None = None) -> None:
        """``flags``: the option that sets a field, where it is not ``--field`` (stage 2's VAE: ``--vae-lr``)."""
        for name in ("steps", "batch", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name, flags)} must be at least 1")
        if not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"{flag('lr', flags)} must be a finite number above 0 (at most {MAX_LR:g})")
        if self.warmup < 0:
            raise ConfigError(f"{flag('warmup', flags)} must be 0 or more")


def flag(name: str, flags: Mapping[str, str] | None = None) -> str:
    """The command-line option that sets ``TrainConfig.name``."""
    return (flags or {}).get(name, f"--{name.replace('_', '-')}")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def schedule(step: int, cfg: TrainConfig) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def order(n: int, seed: int) -> Iterator[int]:
    """Example indices, epoch after epoch, each epoch shuffled by ``seed`` and its number."""
    epoch = 0
    while True:
        idx = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(idx)
        yield from idx
        epoch += 1


def check_out(out: Path, resume: bool, runs: Sequence[Path]) -> None:
    """Before anything loads or is written: a fresh run refuses an OUT that holds an earlier run of any
    kind (stage 1's, stage 2's, pretraining's: it would overwrite its preset.json, or mix checkpoints),
    and ``--resume`` one where none of ``runs`` (the folders whose checkpoints it continues) has a
    checkpoint. A run stopped before its first complete checkpoint holds nothing to keep: it starts
    again without ``--resume``."""
    if resume:
        if all(latest_checkpoint(r) is None for r in runs):
            raise ConfigError(f"--resume: no checkpoint in {out}; start it without --resume")
        return
    held = [name for name in ("preset.json", "planner", "aligned") if _holds(out / name)]
    held += [f"{sub}checkpoints" for sub in ("", "vae/", "dit/") if latest_checkpoint(out / sub) is not None]
    if held:
        raise ConfigError(
            f"{out} holds an earlier run ({', '.join(held)}); pass --resume to continue it, or choose another --out"
        )


def _holds(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def path_input(value: str | Path) -> str:
    """A run's input as recorded for ``--resume``: a path that exists, absolute (``runs/x`` and
    ``/abs/runs/x`` are the same input); a preset name as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def _same_input(then: Any, now: Any) -> bool:
    """Recorded inputs match: equal, or paths to the same place (a run recorded before inputs were
    resolved named ``runs/x`` as given)."""
    if then == now:
        return True
    return isinstance(then, str) and isinstance(now, str) and path_input(then) == path_input(now)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: ``trainer.pt`` is written last, so a folder without it is one
    a crash interrupted, and is passed over."""
    ckpts = sorted(
        (
            p
            for p in (out / "checkpoints").glob("step-*")
            if p.name.split("-")[1].isdigit() and (p / "trainer.pt").is_file()
        ),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return ckpts[-1] if ckpts else None


def run(
    out: Path,
    cfg: TrainConfig,
    n_examples: int,
    params: list[Any],
    loss_of: Callable[[int], Any],
    save_model: Callable[[Path], None],
    load_model: Callable[[Path], None],
    *,
    resume: bool,
    label: str,
    extra: dict[str, Any] | None = None,
    batched: bool = False,
    flags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Train: ``loss_of(i)`` is the loss of example ``i`` (``batched``: ``loss_of([i, ...])`` the
    mean loss of a whole batch, in one forward); ``params`` are the trained parameters; ``flags``: the
    options that set ``cfg``, where they are not ``--field`` (see ``TrainConfig.check``).
    Checkpoints go to ``out/checkpoints/step-N`` (``save_model`` writes the weights; the optimizer,
    schedule position and RNG states are saved beside them), metrics to ``out/metrics.jsonl``."""
    import torch
    from tqdm.auto import tqdm

    cfg.check(flags)
    metrics_path = out / "metrics.jsonl"
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        if state["config"] != asdict(cfg):
            diff = {k: v for k, v in asdict(cfg).items() if state["config"].get(k) != v}
            raise ConfigError(f"--resume: the checkpoint was trained with other settings ({diff}); use the same ones")
        saved_extra = state.get("extra")
        now = extra or {}
        changed = [] if saved_extra is None else [  # checkpoints of earlier versions lack it
            f"{k}: {saved_extra.get(k, 'none')} then, {now.get(k, 'none')} now"
            for k in sorted({*saved_extra, *now}) if not _same_input(saved_extra.get(k), now.get(k))
        ]  # fmt: skip
        if changed:
            raise ConfigError(
                f"--resume: the checkpoint was trained with other inputs ({'; '.join(changed)}); use the same ones"
            )
        load_model(ckpt)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        random.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "numpy_rng" in state:  # checkpoints of earlier versions lack these
            import numpy as np

            np.random.set_state(state["numpy_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        keep = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in keep if m["step"] <= start))
    else:  # refuse before touching anything of an earlier run
        if latest_checkpoint(out) is not None:
            raise ConfigError(f"{out} holds checkpoints of an earlier run; pass --resume, or choose another --out")
        seed_everything(cfg.seed)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    (out / "train.json").write_text(json.dumps({"label": label, "config": asdict(cfg), **(extra or {})}, indent=2))

    indices = order(n_examples, cfg.seed)
    for _ in range(start * cfg.batch):  # the examples the resumed steps already saw
        next(indices)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc=label, unit="step", dynamic_ncols=True)
    last: dict[str, Any] = {}
    with metrics_path.open("a") as metrics, bar:  # the bar closes first: an error or Ctrl-C is a line of its own
        for step in range(start, cfg.steps):
            factor = schedule(step, cfg)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * factor
            opt.zero_grad(set_to_none=True)
            total = 0.0
            if batched:
                loss = loss_of([next(indices) for _ in range(cfg.batch)])
                loss.backward()
                total = float(loss.detach())
            else:
                for _ in range(cfg.batch):
                    loss = loss_of(next(indices)) / cfg.batch
                    loss.backward()
                    total += float(loss.detach())
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not (math.isfinite(total) and math.isfinite(float(norm))):
                _diverged(out, cfg, flags, label, step + 1, f"the loss is {total}" if not math.isfinite(total) else
                          "the gradients are not finite")  # fmt: skip
            opt.step()
            last = {"step": step + 1, "loss": round(total, 6), "lr": cfg.lr * factor,
                    "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{total:.4f}")
            bar.update(1)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                if not all(bool(torch.isfinite(p).all()) for p in params):  # a step that overflowed them
                    _diverged(out, cfg, flags, label, step + 1, "the weights are not finite")
                ckpt = out / "checkpoints" / f"step-{step + 1}"
                ckpt.mkdir(parents=True, exist_ok=True)
                save_model(ckpt)
                torch.save(
                    {"step": step + 1, "optimizer": opt.state_dict(), "config": asdict(cfg), "extra": extra or {},
                     "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                     "numpy_rng": _numpy_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None},
                    ckpt / "trainer.pt",
                )  # fmt: skip
    plot_losses(metrics_path, out / "loss.png", label)
    return last


def _diverged(out: Path, cfg: TrainConfig, flags: Mapping[str, str] | None, label: str, step: int, what: str) -> None:
    """Stop a run whose loss, gradients or weights are no longer finite: nothing is written of that
    step (no metrics row, no checkpoint, and the caller writes no model or preset)."""
    ckpt = latest_checkpoint(out)
    kept = f"its checkpoints up to {ckpt} stay" if ckpt is not None else "no checkpoint was written"
    raise TrainingDivergedError(
        f"{label}: {what} at step {step}: training diverged; lower {flag('lr', flags)} (it was {cfg.lr:g}) and "
        f"start again with another --out ({kept}; no model or preset was written)"
    )


def _numpy_state() -> Any:
    import numpy as np

    return np.random.get_state()


def plot_losses(metrics_path: Path, png: Path, title: str) -> None:
    """A small loss curve (PIL only): loss against step, the axes' ranges written in the corners."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    w, h, m = 640, 360, 40
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([m, m, w - m, h - m], outline=(180, 180, 180))
    d.text((m, 10), f"{title}: loss per step", fill="black")
    if rows:
        steps = [r["step"] for r in rows]
        losses = [r["loss"] for r in rows]
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
        pts = [
            (m + (s - s0) / (s1 - s0) * (w - 2 * m), h - m - (v - lo) / span * (h - 2 * m))
            for s, v in zip(steps, losses, strict=True)
        ]
        if len(pts) > 1:
            d.line(pts, fill=(30, 70, 220), width=2)
        d.text((4, m - 6), f"{hi:.3g}", fill="black")
        d.text((4, h - m - 6), f"{lo:.3g}", fill="black")
        d.text((m, h - m + 6), str(s0), fill="black")
        d.text((w - m - 20, h - m + 6), str(s1), fill="black")
    im.save(png)
