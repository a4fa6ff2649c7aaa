"""Stage 2 of DuoGen: align a video DiT with the frozen planner, earlier images as frames.

Models, built from configs and trained from scratch at toy size (the classes of Cosmos-Predict2):

- **VAE**: ``AutoencoderKLWan`` (phase 1), learning the answers' pictures one frame at a time. A
  training clip is two latent frames, the reference's and the target's, each encoded on its own (the
  real Cosmos VAE packs four video frames into one latent frame; pictures of a plan are not a video). Its
  ``latents_mean``/``latents_std`` are measured on the data afterwards and stored in its config.
- **Connector**: ``Connector`` reads the frozen planner's hidden states (middle and last layer) over
  the tokens of the image prompt it wrote in the image-requesting action, and gives the DiT's
  cross-attention context in place of T5's prompt embedding: 16 learned queries attend to those
  states through a two-layer transformer. With ``context = "t5"`` (the prompt-only ablation) it reads
  a frozen T5 encoder's states over the written prompt instead, as Cosmos-Predict2 does.
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
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duogen_agents.errors import ConfigError
from duogen_agents.training.data import PlannerExample, load_tasks, planner_examples
from duogen_agents.training.loop import TrainConfig, check_out, run

T_CONDITIONING = 0.0001 / (0.0001 + 1)  # the Video2World pipeline's sigma_conditioning, as a t
BLANK = (255, 255, 255)


def _connector_class() -> Any:
    import torch
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from torch import nn

    class Connector(ModelMixin, ConfigMixin):
        """States [B, T, in_dim] over the image prompt's tokens (``mask`` [B, T]: which are real) ->
        DiT context [B, queries, out_dim]: learned queries read the states through a small
        bidirectional transformer, so the context has a fixed length however long the prompt.

        With ``aux_dim`` > 0 it also has a regression head: query ``i`` predicts region ``i`` of the
        target's latent (the queries tile the latent as a square grid; ``regions``), trained beside the
        DiT's loss, so each query carries what its part of the picture holds. ``aux_target`` says what
        it predicts: ``latent`` (the target frame) or ``delta`` (the target frame less the conditioning
        frame: what the request changes, which an edit prompt that names only the change can know)."""

        @register_to_config
        def __init__(
            self,
            in_dim: int,
            out_dim: int,
            tokens: int = 96,
            queries: int = 16,
            width: int = 128,
            layers: int = 2,
            aux_dim: int = 0,
            aux_target: str = "latent",
        ) -> None:
            super().__init__()
            if aux_target not in ("latent", "delta"):
                raise ConfigError(f"aux_target is latent or delta, not {aux_target!r}")
            self.norm = nn.LayerNorm(in_dim)
            self.inp = nn.Linear(in_dim, width)
            self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)
            self.query = nn.Parameter(torch.randn(queries, width) * 0.02)
            block = nn.TransformerEncoderLayer(
                width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
            self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))
            self.aux = nn.Linear(width, aux_dim) if aux_dim > 0 else None

        def hidden(self, states: Any, mask: Any) -> Any:
            """The queries' states [B, queries, width] after reading ``states``."""
            b, t = states.shape[:2]
            x = self.inp(self.norm(states)) + self.pos[:t]
            q = self.query.unsqueeze(0).expand(b, -1, -1)
            pad = torch.cat([torch.zeros(b, q.shape[1], dtype=torch.bool, device=mask.device), ~mask.bool()], dim=1)
            y = self.encoder(torch.cat([q, x], dim=1), src_key_padding_mask=pad)
            return y[:, : q.shape[1]]

        def forward(self, states: Any, mask: Any) -> Any:
            return self.out(self.hidden(states, mask))

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


def regions(latent: Any, grid: int) -> Any:
    """A latent frame [B, C, h, w] as ``grid``x``grid`` regions [B, grid * grid, C * (h / grid) * (w / grid)],
    row by row (the connector's regression targets)."""
    b, c, h, w = latent.shape
    kh, kw = h // grid, w // grid
    return latent.reshape(b, c, grid, kh, grid, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c * kh * kw)


def from_regions(tiles: Any, grid: int, channels: int) -> Any:
    """The inverse of ``regions``: [B, grid * grid, C * k * k] -> a latent frame [B, C, grid * k, grid * k]."""
    b = tiles.shape[0]
    k = round((tiles.shape[-1] // channels) ** 0.5)
    return (
        tiles.reshape(b, grid, grid, channels, k, k).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, grid * k, grid * k)
    )


def region_grid(queries: int, latent_side: int) -> int:
    """The side of the square grid ``queries`` regions tile; a clear error when they cannot tile the latent."""
    grid = round(queries**0.5)
    if grid * grid != queries or latent_side % grid:
        raise ConfigError(
            f"the connector's regression needs a square number of queries tiling the {latent_side}x{latent_side} "
            f"latent; {queries} queries do not"
        )
    return grid


_PROMPT = re.compile(r'"prompt"\s*:\s*"((?:[^"\\]|\\.)*)"')


def prompt_of(action: str) -> str:
    """The image prompt an action asks for (the empty string when it asks for none)."""
    m = _PROMPT.search(action)
    return json.loads(f'"{m.group(1)}"') if m else ""


def prompt_positions(tokenizer: Any, action: str) -> tuple[int, list[int]]:
    """How many tokens ``action`` has (tokenized alone, as stage 1 appends it), and which of them
    spell its image prompt (none when it asks for no picture)."""
    enc = tokenizer(action, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    m = _PROMPT.search(action)
    if m is None:
        return len(enc["input_ids"]), []
    a, b = m.span(1)
    return len(enc["input_ids"]), [i for i, (x, y) in enumerate(enc["offset_mapping"]) if y > a and x < b]


def _padded(hidden: Any, tokens: int) -> tuple[Any, Any]:
    """``hidden`` [n, dim] as ``states`` [tokens, dim] (zeros after the first n) and ``mask`` [tokens]."""
    import torch

    n = min(hidden.shape[0], tokens)
    states = torch.zeros(tokens, hidden.shape[-1])
    mask = torch.zeros(tokens, dtype=torch.bool)
    states[:n] = hidden[:n].float()
    mask[:n] = True
    return states, mask


def planner_states(planner: Any, example: PlannerExample, tokens: int) -> tuple[Any, Any]:
    """The frozen planner's hidden states over the image prompt it wrote: the conversation followed by
    the image-requesting action runs through the planner, and the states of the prompt's tokens are
    taken from its middle and last layers (what each token is, and what the planner makes of it),
    concatenated. Returns ``states`` [tokens, 2 * hidden] and ``mask`` [tokens] (which are real)."""
    import torch

    from duogen_agents.training.stage1 import _encode

    enc = _encode(planner, example.conversation, example.target)
    enc.pop("labels")
    n_target, within = prompt_positions(planner.tokenizer, example.target)
    start = enc["input_ids"].shape[1] - n_target - 1  # the action, then its end token
    picked = [start + i for i in within] if within else list(range(start, enc["input_ids"].shape[1]))
    batch = {k: v.to(planner.device) for k, v in enc.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(planner.model.dtype)
    with torch.no_grad():
        layers = planner.model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    hidden = torch.cat([layers[len(layers) // 2][0], layers[-1][0]], dim=-1).cpu()
    return _padded(hidden[picked], tokens)


def text_encoder_states(encoder: Any, tokenizer: Any, prompt: str, tokens: int) -> tuple[Any, Any]:
    """The prompt-only context: a T5 encoder's last hidden states over the written prompt (the way
    Cosmos-Predict2 conditions its DiT), as ``states`` [tokens, dim] and ``mask`` [tokens]."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=tokens)
    with torch.no_grad():
        hidden = encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[0]
    return _padded(hidden, tokens)


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


# ``keep``: the changed area grows by this many latent positions on each side before the rest is kept
# (chosen on training compositions of the shapes world, 48 tasks: 1 left fragments of removed or redrawn
# objects at the edge of the change, 3 redrew neighbours; 2 read back cleanest).
KEEP_GROW = 2


def sample(
    transformer: Any,
    vae: Any,
    connector: Any,
    states: Any,
    reference: Any,
    *,
    mask: Any = None,
    size: int,
    steps: int = 20,
    seed: int = 0,
    on_step: Any = None,
    start: float = 1.0,
    keep: float = 0.0,
) -> Any:
    """Draw one picture: ``states`` [tokens, dim] and ``mask`` [tokens] (default: all real) from
    ``planner_states`` or ``text_encoder_states``; ``reference`` a PIL picture or None. ``start`` < 1
    (a connector with a regression head): begin at time ``start`` from the connector's predicted latent
    (for an ``aux_target = "delta"`` head: the conditioning frame plus the predicted change) noised to
    that time, instead of from pure noise at 1 (SDEdit's start, from the regression).

    ``keep`` > 0 (an ``aux_target = "delta"`` connector and a ``reference``): blended sampling (Blended
    Latent Diffusion, with the mask from the model itself): the latent positions where the predicted
    change is small (its RMS over channels below ``keep``, in normalised latent units, after growing the
    changed area by ``KEEP_GROW`` positions) are the conditioning frame's, noised to each step's time, so what the
    request does not change is the earlier picture's latent; the rest is drawn. After decoding, the kept
    pixels are the earlier picture's own (as diffusers' inpainting pastes the unmasked image back), so
    they do not drift through the VAE's round trip."""
    import torch

    if not 0 < start <= 1:
        raise ConfigError(f"start must be in (0, 1], not {start}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clip = clip_of(reference, reference if reference is not None else _blank(size), size).unsqueeze(0)
        cond = _normalise(vae, encode_frames(vae, clip))
        if mask is None:
            mask = torch.ones(states.shape[0], dtype=torch.bool)
        noise = torch.randn(cond[:, :, 1:].shape, generator=gen)
        x = noise
        # (any connector module will do; the change and ``keep`` need stage 2's, whose config says what it regresses)
        delta = getattr(getattr(connector, "config", None), "aux_target", "latent") == "delta"
        if keep < 0:
            raise ConfigError(f"keep must be >= 0, not {keep}")
        if keep > 0 and not (delta and getattr(connector, "aux", None) is not None):
            raise ConfigError("keep > 0 needs a connector whose regression head predicts the change (aux_target delta)")
        kept = None
        if start < 1.0 or keep > 0:
            if getattr(connector, "aux", None) is None:
                raise ConfigError("start < 1 needs a connector trained with a regression head (--regression > 0)")
            h = connector.hidden(states.unsqueeze(0), mask.unsqueeze(0))
            context = connector.out(h)
            grid = round(connector.config.queries**0.5)
            change = from_regions(connector.aux(h), grid, x.shape[1]).unsqueeze(2)
            guess = change + cond[:, :, :1] if delta else change  # the change, on the conditioning frame
            if start < 1.0:
                x = (1 - start) * guess + start * noise
            if keep > 0 and reference is not None:  # a picture drawn afresh has nothing to keep
                changed = change.pow(2).mean(1, keepdim=True).sqrt() >= keep  # [1, 1, 1, h, w]
                grown = torch.nn.functional.max_pool2d(
                    changed[:, :, 0].float(), 2 * KEEP_GROW + 1, stride=1, padding=KEEP_GROW
                )
                kept = (grown < 0.5).unsqueeze(2)
        else:
            context = connector(states.unsqueeze(0), mask.unsqueeze(0))
        ts = torch.linspace(start, 0.0, steps + 1)
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            hidden, timestep, mask = dit_inputs(torch.cat([cond[:, :, :1], x], dim=2), t.view(1), x)
            hidden[:, :, 1:] = x  # already noised: x is the sample at time t
            velocity = dit_forward(transformer, hidden, timestep, mask, context, size)[:, :, 1:]
            x = x + (t_next - t) * velocity  # the flow-matching Euler step
            if kept is not None:  # the unchanged part: the earlier picture at this time
                x = torch.where(kept, (1 - t_next) * cond[:, :, :1] + t_next * noise, x)
            if on_step is not None:
                on_step(i + 1, steps)
        frame = vae.decode(_denormalise(vae, x)).sample[0][:, -1]
        if kept is not None:  # and the kept pixels are the earlier picture's own, not its VAE round trip
            scale = size // kept.shape[-1]
            pixels = kept[0, :, 0].repeat_interleave(scale, -2).repeat_interleave(scale, -1)  # [1, size, size]
            frame = torch.where(pixels, clip[0, :, 0], frame)
    return to_image(frame)


def _blank(size: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (size, size), BLANK)


def new_text_encoder(tokens: int = 96) -> tuple[Any, Any]:
    """The prompt-only row's text encoder: a T5 encoder (the class Cosmos-Predict2 conditions on),
    random and frozen (seed 0), with a tokenizer built from the shapes world's words (the same every
    time: ``tiny._unigram_tokenizer``)."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from duogen_agents.models.tiny import _shapes_corpus, _train_tokenizer, _vocab_size

    backend = _train_tokenizer("unigram", 400, ["<pad>", "</s>", "<unk>"], _shapes_corpus())
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
        model_max_length=tokens,
    )  # fmt: skip
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=_vocab_size(tokenizer), d_model=128, d_ff=256, d_kv=32, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval(), tokenizer


CONTEXTS = ("planner", "t5")
# aligned.json's layout: 2 is the connector over the prompt's tokens (learned queries, a small
# transformer) and the "context" key; folders without it came from an earlier connector.
ALIGNED_FORMAT = 2


def _relative(path: Path, start: Path) -> str:
    """``path`` as seen from the folder ``start`` (``../stage1/planner``), or absolute where none exists
    (another drive)."""
    try:
        rel = os.path.relpath(path.resolve(), start.resolve())
    except ValueError:
        return str(path.resolve())
    return rel if rel.startswith("..") else f"./{rel}"  # a path, never a name the hub could take


def write_aligned(out: Path, preset: Any, planner: Path, *, size: int, tokens: int, context: str) -> Path:
    """OUT/aligned/aligned.json (the folder's layout, beside its vae, transformer and connector) and
    OUT/preset.json: ``preset`` (stage 1's) drawing with the aligned folder. Returns the preset's path.

    Paths are written relative: the aligned folder as ``"aligned"`` beside the preset file, and stage 1's
    planner relative to OUT (``"../stage1/planner"``), so runs moved or copied together keep working."""
    final = out / "aligned"
    meta = {"format": ALIGNED_FORMAT, "size": size, "tokens": tokens, "context": context,
            "planner": _relative(planner, final)}  # fmt: skip
    (final / "aligned.json").write_text(json.dumps(meta))
    spec = preset.model_dump(mode="json")
    if spec["planner"].get("backend", "transformers") == "transformers" and Path(spec["planner"]["model"]).is_dir():
        spec["planner"]["model"] = _relative(Path(spec["planner"]["model"]), out)
    spec["name"] = f"{preset.name}-stage2" + ("" if context == "planner" else f"-{context}")
    spec["description"] = f"{preset.description}; DiT aligned by duogen train stage2 (context: {context})"
    spec["image"] = {
        "family": "aligned", "model": f"./{final.name}", "height": size, "width": size, "steps": 20,
        "guidance": 0.0, "device": "cpu", "dtype": "float32",
    }  # fmt: skip
    preset_path = out / "preset.json"
    preset_path.write_text(json.dumps(spec, indent=2))
    return preset_path


# The options of the VAE's training (phase 1), where they are not the DiT's.
VAE_FLAGS = {"steps": "--vae-steps", "batch": "--vae-batch", "lr": "--vae-lr"}


def train_stage2(
    planner_dir: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    vae_cfg: TrainConfig | None = None,
    *,
    size: int = 64,
    tokens: int = 96,
    context: str = "planner",
    regression: float = 1.0,
    vae_from: str | Path | None = None,
    init: str | Path | None = None,
    resume: bool = False,
    home: str | Path | None = None,
) -> Stage2Result:
    """Train the VAE (or take ``vae_from``'s), then the connector and DiT, on the pictures of ``data``'s
    answers. ``context``: ``planner`` (DuoGen: the planner's states over the prompt it wrote) or ``t5``
    (prompt-only: a frozen T5 encoder over the written prompt, as Cosmos-Predict2 does).
    ``regression``: the weight of the connector's regression loss beside the DiT's (0: none; the
    connector then learns from the DiT's loss alone). ``init``: start the DiT and connector from an
    earlier run's (its OUT or ``aligned`` folder; same size, context and connector shape), with that run's
    VAE unless ``vae_from`` names another: to train longer, or to follow a planner trained further."""
    import torch

    from duogen_agents.models.loading import quiet_libraries
    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.presets import load_preset
    from duogen_agents.storage.images import default_home

    if size % 16:
        raise ConfigError("--size must be a multiple of 16")
    if context not in CONTEXTS:
        raise ConfigError(f"--context must be one of {', '.join(CONTEXTS)}")
    if not (regression >= 0 and math.isfinite(regression)):
        raise ConfigError("--regression must be a finite number, 0 or more")
    cfg, vae_cfg = cfg or TrainConfig(), vae_cfg or TrainConfig(steps=200, lr=1e-3)
    cfg.check()
    vae_cfg.check(VAE_FLAGS)
    out = Path(out)
    check_out(out, resume, [out / "vae", out / "dit"])
    run1 = Path(planner_dir)
    if not (run1 / "preset.json").is_file():
        raise ConfigError(f"--planner {planner_dir}: give the OUT folder of `duogen train stage1` (it has preset.json)")
    preset = load_preset(run1 / "preset.json")
    if preset.planner.backend != "transformers":
        raise ConfigError(f"--planner {planner_dir}: its planner is remote; stage 2 reads a local planner's states")
    if context == "planner":
        model = Path(preset.planner.model).expanduser()
        if not preset.planner.model.startswith("tiny:") and _local_path(preset.planner.model) and not model.is_dir():
            raise ConfigError(f"--planner {planner_dir}: its planner folder {model} is missing")
    init_dir = _aligned_source(init) if init is not None else None
    if init_dir is not None:
        meta = json.loads((init_dir / "aligned.json").read_text())
        if meta.get("context", "planner") != context or int(meta["size"]) != size or int(meta["tokens"]) != tokens:
            raise ConfigError(
                f"--init {init}: it was trained with context {meta.get('context', 'planner')}, size {meta['size']}, "
                f"{meta['tokens']} tokens; this run asks for {context}, {size}, {tokens}"
            )
        if vae_from is None and not resume:
            vae_from = init_dir / "vae"
    recorded = out / "vae_from.json"  # a run that reused a VAE resumes with the same one
    if vae_from is None and resume and recorded.is_file():
        vae_from = json.loads(recorded.read_text())["vae"]
    vae_source = _vae_source(vae_from) if vae_from is not None else None
    if vae_source is not None:
        if resume and recorded.is_file() and json.loads(recorded.read_text())["vae"] != str(vae_source.resolve()):
            raise ConfigError(f"--resume: {out} was trained with the VAE of {json.loads(recorded.read_text())['vae']}")
        if resume and not recorded.is_file() and (out / "vae").is_dir():
            raise ConfigError(f"--resume: {out} trained its own VAE; resume it without --vae-from")
    elif resume and (out / "dit" / "checkpoints").exists() and not (out / "vae").is_dir():
        raise ConfigError(f"--resume: {out} has no VAE of its own; give the --vae-from it was trained with")
    tasks = load_tasks(data)
    with tempfile.TemporaryDirectory(prefix="duogen-teacher-") as tmp:
        examples = [e for e in planner_examples(tasks, preset, Path(tmp)) if e.picture is not None]
    if not examples:
        raise ConfigError(f"{data}: no answer draws a picture; stage 2 needs pictures")
    clips = torch.stack([clip_of(e.references[-1] if e.references else None, e.picture, size) for e in examples])

    # ---- phase 1: the VAE -------------------------------------------------------------------------
    torch.manual_seed(vae_cfg.seed)
    vae = new_vae()

    def vae_load(ckpt: Path) -> None:
        from diffusers import AutoencoderKLWan

        vae.load_state_dict(AutoencoderKLWan.from_pretrained(ckpt / "vae").state_dict())

    if vae_source is not None:
        from diffusers import AutoencoderKLWan

        vae.load_state_dict(AutoencoderKLWan.from_pretrained(vae_source).state_dict())
    elif resume and (out / "vae" / "done.json").is_file():
        vae_load(_last(out / "vae"))
    else:
        _train_vae(vae, clips, out / "vae", vae_cfg, resume=resume and (out / "vae" / "checkpoints").exists())
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        raw = torch.cat([encode_frames(vae, clips[i : i + 8]) for i in range(0, len(clips), 8)])
    vae.register_to_config(
        latents_mean=raw.mean(dim=(0, 2, 3, 4)).tolist(), latents_std=(raw.std(dim=(0, 2, 3, 4)) + 1e-6).tolist()
    )
    latents = _normalise(vae, raw)

    # ---- the context: the frozen planner's states, or T5's -----------------------------------------
    root = Path(home) if home is not None else default_home()
    quiet_libraries()
    text_encoder = text_tokenizer = None
    if context == "planner":
        planner = TransformersPlanner.from_spec(preset.planner, preset.models_path(root))
        pairs = [planner_states(planner, e, tokens) for e in examples]
        del planner
    else:
        text_encoder, text_tokenizer = new_text_encoder(tokens)
        pairs = [text_encoder_states(text_encoder, text_tokenizer, prompt_of(e.target), tokens) for e in examples]
    states = torch.stack([p[0] for p in pairs])
    masks = torch.stack([p[1] for p in pairs])

    # ---- phase 2: connector and DiT -----------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    context_dim = 64
    queries = 16
    grid = region_grid(queries, latents.shape[-1])
    aux_dim = latents.shape[1] * (latents.shape[-1] // grid) ** 2 if regression > 0 else 0
    connector = _connector_class()(
        in_dim=states.shape[-1],
        out_dim=context_dim,
        tokens=tokens,
        queries=queries,
        aux_dim=aux_dim,
        aux_target="delta",
    )
    transformer = new_transformer(context_dim)
    if init_dir is not None:
        _load_into(transformer, connector, init_dir, init)
    connector.train()
    transformer.train()
    gen = torch.Generator().manual_seed(cfg.seed)

    def dit_loss(idx: list[int]) -> Any:
        z = latents[idx]
        t = torch.sigmoid(torch.randn(len(idx), generator=gen))  # logit-normal times
        noise = torch.randn(z[:, :, 1:].shape, generator=gen)
        hidden, timestep, mask = dit_inputs(z, t, noise)
        h = connector.hidden(states[idx], masks[idx])
        pred = dit_forward(transformer, hidden, timestep, mask, connector.out(h), size)[:, :, 1:]
        loss = torch.nn.functional.mse_loss(pred, noise - z[:, :, 1:])
        if connector.aux is not None:  # each query regresses its region of the change
            target = regions(z[:, :, 1] - z[:, :, 0], grid)  # the change from the conditioning frame
            loss = loss + regression * torch.nn.functional.mse_loss(connector.aux(h), target)
        return loss

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
    if vae_source is not None:  # written once every refusal is past: a refused command leaves no record
        out.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps({"vae": str(vae_source.resolve())}))
    dit_last = run(
        out / "dit", cfg, len(latents), params, dit_loss, dit_save, dit_load, resume=resume and
        (out / "dit" / "checkpoints").exists(), label="stage 2: DiT + connector", batched=True,
        extra={"planner": str(run1.resolve()), "data": str(Path(data).resolve()), "examples": len(latents),
               "size": size, "tokens": tokens, "context": context,
               "vae": str(vae_source.resolve()) if vae_source is not None else "OUT/vae",
               **({"init": str(init_dir.resolve())} if init_dir is not None else {}),
               # runs without the head (and those of earlier versions) lack the key
               **({"regression": regression, "aux_target": "delta"} if regression > 0 else {})},
    )  # fmt: skip

    final = out / "aligned"
    vae.save_pretrained(final / "vae")
    transformer.eval().save_pretrained(final / "transformer")
    connector.eval().save_pretrained(final / "connector")
    if text_encoder is not None:
        text_encoder.save_pretrained(final / "text_encoder")
        text_tokenizer.save_pretrained(final / "tokenizer")
    preset_path = write_aligned(out, preset, run1 / "planner", size=size, tokens=tokens, context=context)
    vae_rows = _metrics(out / "vae") if vae_source is None else [float("nan")]
    dit_rows = _metrics(out / "dit")
    return Stage2Result(
        out, preset_path, len(latents), (vae_rows[0], vae_rows[-1]), (dit_rows[0], dit_last.get("loss", dit_rows[-1]))
    )


def _local_path(model: str) -> bool:
    """A model named by a path (absolute, or ``./`` / ``../``, as training writes them), not a hub id."""
    return Path(model).expanduser().is_absolute() or model.startswith(("./", "../"))


def _aligned_source(init: str | Path) -> Path:
    """The ``aligned`` folder of ``init``: an earlier stage 2's OUT, or that folder itself."""
    path = Path(init)
    for candidate in (path / "aligned", path):
        if (candidate / "aligned.json").is_file():
            return candidate
    raise ConfigError(f"--init {init}: not the OUT of `duogen train stage2` nor its aligned folder (no aligned.json)")


def _load_into(transformer: Any, connector: Any, folder: Path, init: str | Path) -> None:
    """Copy an aligned folder's DiT and connector weights into freshly built ones; a clear error when
    their shapes differ (another planner width, no regression head, ...)."""
    from diffusers import CosmosTransformer3DModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        donor_dit = CosmosTransformer3DModel.from_pretrained(folder / "transformer")
        donor_con = type(connector).from_pretrained(folder / "connector")
    for key in ("in_dim", "out_dim", "tokens", "queries", "width", "layers", "aux_dim", "aux_target"):
        if donor_con.config.get(key) != connector.config.get(key):
            raise ConfigError(
                f"--init {init}: its connector has {key} = {donor_con.config.get(key)!r}, this run builds "
                f"{connector.config.get(key)!r} (another planner or --regression)"
            )
    try:
        transformer.load_state_dict(donor_dit.state_dict())
    except RuntimeError as e:
        raise ConfigError(f"--init {init}: its DiT has another shape: {str(e).splitlines()[0]}") from e
    connector.load_state_dict(donor_con.state_dict())


def _vae_source(vae_from: str | Path) -> Path:
    """A trained VAE to reuse: the OUT folder of an earlier stage 2, its ``aligned`` folder, or a
    ``from_pretrained`` VAE folder."""
    path = Path(vae_from)
    for candidate in (path / "aligned" / "vae", path / "vae", path):
        if (candidate / "config.json").is_file() and "AutoencoderKLWan" in (candidate / "config.json").read_text():
            return candidate
    raise ConfigError(f"--vae-from {vae_from}: no trained VAE there (give the OUT folder of an earlier stage 2)")


def _train_vae(vae: Any, clips: Any, run_dir: Path, cfg: TrainConfig, *, resume: bool) -> None:
    """Phase 1: the VAE learns every picture as a one-frame video."""
    import torch

    pictures = torch.cat([clips[:, :, i : i + 1] for i in range(clips.shape[2])])  # every frame, one-frame videos

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

    vae.train()
    last = run(
        run_dir, cfg, len(pictures), list(vae.parameters()), vae_loss, vae_save, vae_load,
        resume=resume, label="stage 2: VAE", batched=True, flags=VAE_FLAGS,
    )  # fmt: skip
    (run_dir / "done.json").write_text(json.dumps(last))


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
    meta = json.loads((folder / "aligned.json").read_text())
    if meta.get("format") != ALIGNED_FORMAT:
        raise ConfigError(
            f"{folder} was made by an earlier duogen train stage2 (another connector); train stage 2 again"
        )
    vae = AutoencoderKLWan.from_pretrained(folder / "vae").eval()
    transformer = CosmosTransformer3DModel.from_pretrained(folder / "transformer").eval()
    connector = _connector_class().from_pretrained(folder / "connector").eval()
    return vae, transformer, connector, meta


def load_text_encoder(folder: str | Path) -> tuple[Any, Any]:
    """The frozen T5 encoder and tokenizer of a prompt-only (``context = t5``) aligned folder."""
    from transformers import AutoTokenizer, T5EncoderModel

    folder = Path(folder)
    return T5EncoderModel.from_pretrained(folder / "text_encoder").eval(), AutoTokenizer.from_pretrained(
        folder / "tokenizer"
    )
