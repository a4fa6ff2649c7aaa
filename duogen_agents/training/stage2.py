"""Stage 2 of DuoGen: align a video DiT with the frozen planner, earlier images as frames.

Models, built from configs and trained from scratch at toy size (the classes of Cosmos-Predict2):

- **VAE**: ``AutoencoderKLWan`` (phase 1), learning the answers' pictures one frame at a time. A
  training clip is two latent frames, the reference's and the target's, each encoded on its own (the
  real Cosmos VAE packs four video frames into one latent frame; pictures of a plan are not a video). Its
  ``latents_mean``/``latents_std`` are measured on the data afterwards and stored in its config.
- **Connector**: ``Connector`` maps the planner's last-layer hidden states over the last ``tokens``
  positions of the conversation and the image-requesting action (the planner is frozen) to the DiT's
  cross-attention context, in place of T5's prompt embedding.
- **DiT**: ``CosmosTransformer3DModel`` with Video2World's inputs (latents plus the conditioning-mask
  channel), trained with the objective of diffusers' Cosmos2 Video2World pipeline: on the target latent
  frame ``x_t = (1 - t) x0 + t eps`` at timestep ``t``, the conditioning frame clean at the pipeline's
  ``t_conditioning``, and the model predicts ``eps - x0`` (flow matching; the pipeline's
  ``c_in, c_skip, c_out`` reduce to exactly this).

``sample`` draws with the trained trio by Euler steps over ``t`` from 1 to 0 (the flow-matching Euler
scheduler's step), which the ``aligned`` image family uses. The first picture of an answer has no
reference: its conditioning frame is a blank canvas, as in training.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duogen_agents.errors import ConfigError
from duogen_agents.training.data import PlannerExample, load_tasks, planner_examples
from duogen_agents.training.loop import TrainConfig, run

T_CONDITIONING = 0.0001 / (0.0001 + 1)  # the Video2World pipeline's sigma_conditioning, as a t
BLANK = (255, 255, 255)


def _connector_class() -> Any:
    import torch
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from torch import nn

    class Connector(ModelMixin, ConfigMixin):
        """Planner hidden states [B, tokens, in_dim] -> DiT context [B, tokens, out_dim]."""

        @register_to_config
        def __init__(self, in_dim: int, out_dim: int, tokens: int = 48, hidden: int = 128) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(in_dim)
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
            self.pos = nn.Parameter(torch.randn(tokens, out_dim) * 0.02)  # which of the last positions

        def forward(self, states: Any) -> Any:
            return self.proj(self.norm(states)) + self.pos

    return Connector


def new_vae() -> Any:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, False]
    )


def new_transformer(context_dim: int) -> Any:
    from diffusers import CosmosTransformer3DModel

    return CosmosTransformer3DModel(
        in_channels=16 + 1,  # latents + Video2World's conditioning mask
        out_channels=16,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=4,
        mlp_ratio=2.0,
        text_embed_dim=context_dim,
        adaln_lora_dim=32,
        max_size=(8, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=True,
        extra_pos_embed_type="learnable",
    )


def to_tensor(image: Any, size: int) -> Any:
    """A PIL picture as a [3, size, size] tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    im = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def to_image(x: Any) -> Any:
    import numpy as np
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def clip_of(reference: Any, target: Any, size: int) -> Any:
    """[3, 2, size, size]: the reference (a blank canvas where there is none) and the target."""
    import torch
    from PIL import Image

    ref = to_tensor(reference if reference is not None else Image.new("RGB", (size, size), BLANK), size)
    tgt = to_tensor(target, size)
    return torch.stack([ref, tgt], dim=1)


def encode_frames(vae: Any, clips: Any) -> Any:
    """Latents [B, 16, 2, h, w] of clips [B, 3, 2, H, W], each frame encoded on its own (posterior mode)."""
    import torch

    return torch.cat([vae.encode(clips[:, :, i : i + 1]).latent_dist.mode() for i in range(clips.shape[2])], dim=2)


def planner_states(planner: Any, example: PlannerExample, tokens: int) -> Any:
    """The frozen planner's last-layer hidden states over the last ``tokens`` positions of the
    conversation followed by the image-requesting action (zeros in front of a shorter sequence)."""
    import torch

    from duogen_agents.training.stage1 import _encode

    enc = _encode(planner, example.conversation, example.target)
    enc.pop("labels")
    batch = {k: v.to(planner.device) for k, v in enc.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(planner.model.dtype)
    with torch.no_grad():
        hidden = planner.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1][0].float()
    out = torch.zeros(tokens, hidden.shape[-1])
    take = hidden[-tokens:].cpu()
    out[tokens - take.shape[0] :] = take
    return out


@dataclass
class Stage2Result:
    out: Path
    preset: Path
    examples: int
    vae_loss: tuple[float, float]
    dit_loss: tuple[float, float]


def _latent_stats(vae: Any) -> tuple[Any, Any]:
    import torch

    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def _normalise(vae: Any, z: Any) -> Any:
    mean, std = _latent_stats(vae)
    return (z - mean) / std


def _denormalise(vae: Any, z: Any) -> Any:
    mean, std = _latent_stats(vae)
    return z * std + mean


def dit_inputs(latents: Any, t: Any, noise: Any) -> tuple[Any, Any, Any]:
    """Video2World's transformer inputs for clean ``latents`` [B, 16, 2, h, w] at target time ``t`` [B]:
    the conditioning frame clean, the target frame noised; per-frame timesteps; the mask channel."""
    import torch

    b = latents.shape[0]
    x0 = latents[:, :, 1:]
    tt = t.view(b, 1, 1, 1, 1)
    noisy = (1 - tt) * x0 + tt * noise
    hidden = torch.cat([latents[:, :, :1], noisy], dim=2)
    timestep = torch.cat([torch.full((b, 1, 1, 1, 1), T_CONDITIONING), tt], dim=2)
    mask = torch.zeros(b, 1, 2, latents.shape[-2], latents.shape[-1])
    mask[:, :, 0] = 1.0
    return hidden, timestep, mask


def dit_forward(transformer: Any, hidden: Any, timestep: Any, mask: Any, context: Any, size: int) -> Any:
    import torch

    padding = torch.zeros(1, 1, size, size)
    return transformer(
        hidden_states=hidden, timestep=timestep, encoder_hidden_states=context, fps=16,
        condition_mask=mask, padding_mask=padding, return_dict=False,
    )[0]  # fmt: skip


def sample(
    transformer: Any,
    vae: Any,
    connector: Any,
    states: Any,
    reference: Any,
    *,
    size: int,
    steps: int = 20,
    seed: int = 0,
    on_step: Any = None,
) -> Any:
    """Draw one picture: ``states`` [tokens, dim] from the planner, ``reference`` a PIL picture or None."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clip = clip_of(reference, reference if reference is not None else _blank(size), size).unsqueeze(0)
        cond = _normalise(vae, encode_frames(vae, clip))
        context = connector(states.unsqueeze(0))
        x = torch.randn(cond[:, :, 1:].shape, generator=gen)
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            hidden, timestep, mask = dit_inputs(torch.cat([cond[:, :, :1], x], dim=2), t.view(1), x)
            hidden[:, :, 1:] = x  # already noised: x is the sample at time t
            velocity = dit_forward(transformer, hidden, timestep, mask, context, size)[:, :, 1:]
            x = x + (t_next - t) * velocity  # the flow-matching Euler step
            if on_step is not None:
                on_step(i + 1, steps)
        frame = vae.decode(_denormalise(vae, x)).sample[0]
    return to_image(frame[:, -1])


def _blank(size: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (size, size), BLANK)


def train_stage2(
    planner_dir: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    vae_cfg: TrainConfig | None = None,
    *,
    size: int = 64,
    tokens: int = 48,
    resume: bool = False,
    home: str | Path | None = None,
) -> Stage2Result:
    """Train the VAE, then the connector and DiT, on the pictures of ``data``'s answers."""
    import torch

    from duogen_agents.models.loading import quiet_libraries
    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.presets import load_preset
    from duogen_agents.storage.images import default_home

    if size % 16:
        raise ConfigError("--size must be a multiple of 16")
    cfg, vae_cfg = cfg or TrainConfig(), vae_cfg or TrainConfig(steps=200, lr=2e-3)
    out = Path(out)
    run1 = Path(planner_dir)
    if not (run1 / "preset.json").is_file():
        raise ConfigError(f"--planner {planner_dir}: give the OUT folder of `duogen train stage1` (it has preset.json)")
    preset = load_preset(run1 / "preset.json")
    if preset.planner.backend != "transformers":
        raise ConfigError(f"--planner {planner_dir}: its planner is remote; stage 2 reads a local planner's states")
    tasks = load_tasks(data)
    with tempfile.TemporaryDirectory(prefix="duogen-teacher-") as tmp:
        examples = [e for e in planner_examples(tasks, preset, Path(tmp)) if e.picture is not None]
    if not examples:
        raise ConfigError(f"{data}: no answer draws a picture; stage 2 needs pictures")
    root = Path(home) if home is not None else default_home()
    quiet_libraries()
    planner = TransformersPlanner.from_spec(preset.planner, preset.models_path(root))
    states = torch.stack([planner_states(planner, e, tokens) for e in examples])
    clips = torch.stack([clip_of(e.references[-1] if e.references else None, e.picture, size) for e in examples])
    del planner

    # ---- phase 1: the VAE -------------------------------------------------------------------------
    torch.manual_seed(vae_cfg.seed)
    vae = new_vae()

    pictures = torch.cat([clips[:, :, :1], clips[:, :, 1:]])  # every frame, as a one-frame video

    # Pictures of plans are mostly blank canvas: plain MSE is low for a VAE that paints the canvas
    # and blurs the objects away (measured on the shapes world: the objects vanish from the
    # reconstructions). Pixels away from the canvas colour weigh ten times more.
    ink = ((pictures - 1.0).abs().amax(dim=1, keepdim=True) > 0.2).float()
    weights = 1.0 + 9.0 * ink

    def vae_loss(idx: list[int]) -> Any:
        x, w = pictures[idx], weights[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        err = (w * (recon - x) ** 2).sum() / (w.sum() * x.shape[1])
        return err + 1e-6 * posterior.kl().mean()

    def vae_save(ckpt: Path) -> None:
        vae.save_pretrained(ckpt / "vae")

    def vae_load(ckpt: Path) -> None:
        from diffusers import AutoencoderKLWan

        vae.load_state_dict(AutoencoderKLWan.from_pretrained(ckpt / "vae").state_dict())

    vae_resume = resume and (out / "vae" / "checkpoints").exists()
    vae_done = (out / "vae" / "done.json").is_file() and resume
    if not vae_done:
        vae.train()
        vae_last = run(
            out / "vae", vae_cfg, len(pictures), list(vae.parameters()), vae_loss, vae_save, vae_load,
            resume=vae_resume, label="stage 2: VAE", batched=True,
        )  # fmt: skip
        (out / "vae" / "done.json").write_text(json.dumps(vae_last))
    else:
        vae_load(_last(out / "vae"))
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        raw = torch.cat([encode_frames(vae, clips[i : i + 8]) for i in range(0, len(clips), 8)])
    vae.register_to_config(
        latents_mean=raw.mean(dim=(0, 2, 3, 4)).tolist(), latents_std=(raw.std(dim=(0, 2, 3, 4)) + 1e-6).tolist()
    )
    latents = _normalise(vae, raw)

    # ---- phase 2: connector and DiT -----------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    context_dim = 64
    connector = _connector_class()(in_dim=states.shape[-1], out_dim=context_dim, tokens=tokens)
    transformer = new_transformer(context_dim)
    connector.train()
    transformer.train()
    gen = torch.Generator().manual_seed(cfg.seed)

    def dit_loss(idx: list[int]) -> Any:
        z = latents[idx]
        t = torch.sigmoid(torch.randn(len(idx), generator=gen))  # logit-normal times
        noise = torch.randn(z[:, :, 1:].shape, generator=gen)
        hidden, timestep, mask = dit_inputs(z, t, noise)
        pred = dit_forward(transformer, hidden, timestep, mask, connector(states[idx]), size)[:, :, 1:]
        return torch.nn.functional.mse_loss(pred, noise - z[:, :, 1:])

    def dit_save(ckpt: Path) -> None:
        transformer.save_pretrained(ckpt / "transformer")
        connector.save_pretrained(ckpt / "connector")
        torch.save(gen.get_state(), ckpt / "noise_rng.pt")

    def dit_load(ckpt: Path) -> None:
        from diffusers import CosmosTransformer3DModel

        transformer.load_state_dict(CosmosTransformer3DModel.from_pretrained(ckpt / "transformer").state_dict())
        connector.load_state_dict(type(connector).from_pretrained(ckpt / "connector").state_dict())
        gen.set_state(torch.load(ckpt / "noise_rng.pt"))

    params = list(transformer.parameters()) + list(connector.parameters())
    dit_last = run(
        out / "dit", cfg, len(latents), params, dit_loss, dit_save, dit_load, resume=resume and
        (out / "dit" / "checkpoints").exists(), label="stage 2: DiT + connector", batched=True,
        extra={"planner": str(run1.resolve()), "data": str(Path(data).resolve()), "examples": len(latents),
               "size": size, "tokens": tokens},
    )  # fmt: skip

    final = out / "aligned"
    vae.save_pretrained(final / "vae")
    transformer.eval().save_pretrained(final / "transformer")
    connector.eval().save_pretrained(final / "connector")
    (final / "aligned.json").write_text(
        json.dumps({"size": size, "tokens": tokens, "planner": str((run1 / "planner").resolve())})
    )
    spec = preset.model_dump(mode="json")
    spec["name"] = f"{preset.name}-stage2"
    spec["description"] = f"{preset.description}; DiT aligned by duogen train stage2"
    spec["image"] = {
        "family": "aligned", "model": str(final.resolve()), "height": size, "width": size, "steps": 20,
        "guidance": 0.0, "device": "cpu", "dtype": "float32",
    }  # fmt: skip
    preset_path = out / "preset.json"
    preset_path.write_text(json.dumps(spec, indent=2))
    vae_rows = _metrics(out / "vae")
    dit_rows = _metrics(out / "dit")
    return Stage2Result(
        out, preset_path, len(latents), (vae_rows[0], vae_rows[-1]), (dit_rows[0], dit_last.get("loss", dit_rows[-1]))
    )


def _last(run_dir: Path) -> Path:
    from duogen_agents.training.loop import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    return ckpt


def _metrics(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_aligned(folder: str | Path) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The trained VAE, DiT and connector of ``OUT/aligned``, and its settings."""
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel

    folder = Path(folder)
    vae = AutoencoderKLWan.from_pretrained(folder / "vae").eval()
    transformer = CosmosTransformer3DModel.from_pretrained(folder / "transformer").eval()
    connector = _connector_class().from_pretrained(folder / "connector").eval()
    return vae, transformer, connector, json.loads((folder / "aligned.json").read_text())
