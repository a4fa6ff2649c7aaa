"""Cosmos-Predict2 (diffusers): Text2Image for ``generate`` without references, Video2World for ``continue``.

``continue`` is what a video model is for: the references (oldest first, letterboxed to the canvas)
become the first frames of a clip, and the new image is the frame ``image.horizon_frames`` after the
last of them. Cosmos-Predict2 Video2World was trained with 1 or 5 conditioning frames (one or two
latent frames: its VAE packs four pixel frames into one), so one reference is one frame, and two to
five are padded to five by repeating the newest; more are refused. ``generate`` and ``edit`` with
references are not a video's next moment: a preset routes them to another family
(``image.references``, e.g. FLUX.2 klein) or the planner is never offered them. Both pipelines share
the VAE and the T5 text encoder (loaded once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from duogen_agents.errors import ConfigError, GenerationError, ModelLoadError
from duogen_agents.models.images import (
    cache_counts,
    compile_dit,
    first_block_cache,
    fresh_scheduler,
    reset_cache,
    vae_tiling,
)
from duogen_agents.models.images.safety import PassThroughSafetyChecker
from duogen_agents.models.loading import generating, loading, resolve_device, resolve_dtype, resolve_source
from duogen_agents.models.protocols import Drawing, ImageKind, StepCallback, letterbox, refusal
from duogen_agents.models.serial import device_turn
from duogen_agents.presets import ImageSpec


def _safety_checker(kind: str) -> Any:
    if kind == "none":
        return PassThroughSafetyChecker()
    try:
        from cosmos_guardrail import CosmosSafetyChecker
    except ImportError as e:
        raise ModelLoadError(
            "the Cosmos pipelines need the cosmos_guardrail package (pip install cosmos_guardrail), "
            "or image.safety_checker = 'none' in your preset file"
        ) from e
    return CosmosSafetyChecker()


# Video2World was trained on 1 or 5 conditioning frames.
CONDITIONING_FRAMES = (1, 5)
MAX_REFERENCES = CONDITIONING_FRAMES[-1]


def conditioning_frames(
    references: Sequence[Image.Image], horizon: int, temporal_factor: int
) -> tuple[list[Image.Image], int, int]:
    """The clip to condition on and where the new image is in the output.

    Returns (frames, num_frames, index): ``frames`` is 1 or 5 frames (references oldest first, the
    newest repeated to fill), ``num_frames`` the clip length to sample (``1 + k * temporal_factor``,
    at least the conditioning plus the horizon), and ``index`` the output frame that is ``horizon``
    frames after the last conditioning frame."""
    if not 1 <= len(references) <= MAX_REFERENCES:
        raise ValueError(f"Video2World takes 1 to {MAX_REFERENCES} reference frames, not {len(references)}")
    cond = next(n for n in CONDITIONING_FRAMES if n >= len(references))
    frames = list(references) + [references[-1]] * (cond - len(references))
    wanted = cond + horizon
    num_frames = 1 + math.ceil((wanted - 1) / temporal_factor) * temporal_factor
    return frames, num_frames, cond - 1 + horizon


def dit_limits(pipe: Any) -> tuple[int, int, int]:
    """The largest clip the pipeline's DiT holds, as (frames, height, width) in pixels: its config's
    ``max_size`` (latent frames, height, width; the positional embeddings cover that many patches and
    no more) through the VAE's factors. Past it every DiT call fails on a tensor size mismatch."""
    config = pipe.transformer.config
    frames, height, width = (
        size // patch * patch for size, patch in zip(config.max_size, config.patch_size, strict=True)
    )
    spatial = pipe.vae_scale_factor_spatial
    return 1 + (frames - 1) * pipe.vae_scale_factor_temporal, height * spatial, width * spatial


def check_fits(spec: ImageSpec, pipe: Any, source: str, *, clip: bool = False) -> None:
    """Refuse, before any draw, a canvas (and with ``clip``, Video2World's longest clip: five
    conditioning frames and ``horizon_frames``) larger than the pipeline's DiT holds."""
    frames, height, width = dit_limits(pipe)
    max_size = tuple(pipe.transformer.config.max_size)
    if spec.height > height or spec.width > width:
        raise ConfigError(
            f"image.height x image.width {spec.height}x{spec.width} is more than the DiT of {source} holds: at most "
            f"{height}x{width} (its max_size {max_size} in latent frames, height and width, "
            f"{pipe.vae_scale_factor_spatial} pixels a latent); make the canvas smaller in the preset file"
        )
    if clip and CONDITIONING_FRAMES[-1] + spec.horizon_frames > frames:
        raise ConfigError(
            f"image.horizon_frames {spec.horizon_frames} is more than the DiT of {source} holds: at most "
            f"{frames - CONDITIONING_FRAMES[-1]} (a clip of {frames} frames, its max_size {max_size}, less "
            f"{CONDITIONING_FRAMES[-1]} conditioning frames); lower it in the preset file"
        )


class CosmosImageTool:
    """Cosmos-Predict2 Text2Image + Video2World. Build it with ``from_spec``."""

    family = "cosmos2"
    capabilities: Mapping[str, int] = {"continue": MAX_REFERENCES}

    def __init__(self, text2image: Any, spec: ImageSpec, video2world_source: str, safety_checker: Any) -> None:
        self.text2image = text2image
        self.spec = spec
        self._video2world: Any = None
        self._video2world_refused: str | None = None  # check_fits' refusal of the loaded Video2World
        self._video2world_source = video2world_source
        self._safety_checker = safety_checker
        self.residency: Any = None  # set by residency.offload_image_tool (preset offload)
        self.device = str(text2image.device)  # where it runs, also while offloaded to the CPU

    def offload_roles(self) -> dict[str, list[Any]]:
        """Each pipeline with its text encoder, DiT and VAE (Video2World loaded now, so that its
        weights too wait on the CPU)."""
        t2i, v2w = self.text2image, self.video2world
        return {
            f"text2image:{id(self)}": [t2i.text_encoder, t2i.transformer, t2i.vae],
            f"video2world:{id(self)}": [v2w.text_encoder, v2w.transformer, v2w.vae],
        }

    def _use(self, pipeline: str) -> None:
        if self.residency is not None:
            self.residency.use(f"{pipeline}:{id(self)}")

    @staticmethod
    def _source(name: str, models_dir: Path | None) -> str:
        if name.startswith("tiny:"):
            from duogen_agents.models.tiny import ensure_tiny_image_pipelines

            if models_dir is None:
                raise ModelLoadError("the tiny image tool needs a models cache directory")
            with loading("tiny image tool", name):
                paths = ensure_tiny_image_pipelines(models_dir)
            return str(paths[name.split(":", 1)[1]])
        return resolve_source(name, "image model")

    @classmethod
    def from_spec(cls, spec: ImageSpec, models_dir: Path | None = None) -> CosmosImageTool:
        from diffusers import Cosmos2TextToImagePipeline

        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        source = cls._source(spec.text2image, models_dir)
        v2w_source = cls._source(spec.video2world, models_dir)
        checker = _safety_checker(spec.safety_checker)
        with loading("image model", source):
            pipe = Cosmos2TextToImagePipeline.from_pretrained(source, safety_checker=checker, dtype=dtype)
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            vae_tiling(pipe.vae, spec.vae_tiling)  # the Video2World pipeline shares this VAE
            if spec.compile:
                compile_dit(pipe.transformer)
            first_block_cache(pipe.transformer, spec.first_block_cache)
        check_fits(spec, pipe, spec.text2image)  # a canvas its DiT cannot hold fails here, not at every draw
        return cls(pipe, spec, v2w_source, checker)

    @property
    def video2world(self) -> Any:
        """Loaded on first use, sharing the VAE and text encoder with Text2Image; its VAE encodes the
        conditioning frames only (``video2world``: the same result as diffusers' pipeline)."""
        if self._video2world_refused is not None:  # not loaded again (2B of weights) only to refuse again
            raise ConfigError(self._video2world_refused)
        if self._video2world is None:
            from duogen_agents.models.images.video2world import ConditioningVideo2World

            t2i = self.text2image
            with loading("video image model", self._video2world_source):
                pipe = ConditioningVideo2World.from_pretrained(
                    self._video2world_source,
                    text_encoder=t2i.text_encoder,
                    tokenizer=t2i.tokenizer,
                    vae=t2i.vae,
                    safety_checker=self._safety_checker,
                    dtype=t2i.transformer.dtype,
                )
                pipe.to(t2i.device)
                pipe.set_progress_bar_config(disable=True)
                if self.spec.compile:
                    compile_dit(pipe.transformer)
                first_block_cache(pipe.transformer, self.spec.first_block_cache)
            try:
                check_fits(self.spec, pipe, self.spec.video2world, clip=True)  # before its first draw
            except ConfigError as e:
                self._video2world_refused = str(e)
                raise
            self._video2world = pipe
        return self._video2world

    def _common(self, prompt: str, seed: int, on_step: StepCallback | None) -> dict[str, Any]:
        spec = self.spec
        total = spec.steps

        def _callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, total)
            return kwargs

        return dict(
            prompt=prompt,
            negative_prompt=spec.negative_prompt,
            height=spec.height,
            width=spec.width,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            max_sequence_length=spec.max_sequence_length,
            callback_on_step_end=_callback,
        )

    def draw(
        self,
        prompt: str,
        *,
        kind: ImageKind = "generate",
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> Drawing:
        if problem := refusal(self.capabilities, kind, len(references)):
            raise GenerationError(problem)
        size = (self.spec.width, self.spec.height)
        with device_turn(self.device), generating("image model"):
            if not references:
                self._use("text2image")
                fresh_scheduler(self.text2image)
                reset_cache(self.text2image.transformer)
                with self._batched(self.text2image) as paired:
                    out = self.text2image(**self._common(prompt, seed, on_step))
                details = {**cache_counts(self.text2image.transformer), **self._counts(paired)}
                return Drawing(out.images[0].convert("RGB"), self.family, "text2image", details=details)
            pipe = self.video2world
            self._use("video2world")
            fresh_scheduler(pipe)
            reset_cache(pipe.transformer)
            fitted = [letterbox(im, size) for im in references]
            frames, num_frames, index = conditioning_frames(
                fitted, self.spec.horizon_frames, pipe.vae_scale_factor_temporal
            )
            with self._batched(pipe) as paired:
                out = pipe(
                    video=frames, num_frames=num_frames, fps=self.spec.fps, **self._common(prompt, seed, on_step)
                )
            video = out.frames[0]
            return Drawing(
                video[index].convert("RGB"),
                self.family,
                "video2world",
                frames=len(frames),
                horizon=index - (len(frames) - 1),
                details={
                    "num_frames": num_frames,
                    "fps": self.spec.fps,
                    **cache_counts(pipe.transformer),
                    **self._counts(paired),
                },
            )

    def _batched(self, pipe: Any) -> AbstractContextManager[Any]:
        """``image.cfg_batch`` with guidance on: the DiT's two calls per step as one batch
        (``guidance_batch``); otherwise the pipeline as it is."""
        if self.spec.cfg_batch and self.spec.guidance > 1:
            from duogen_agents.models.images.guidance_batch import one_batch

            return one_batch(pipe)
        return nullcontext()

    @staticmethod
    def _counts(paired: Any) -> dict[str, Any]:
        if paired is None:
            return {}
        from duogen_agents.models.images.guidance_batch import counts

        return counts(paired)
