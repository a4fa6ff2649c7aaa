"""The image tool: diffusers Cosmos-Predict2 pipelines.

Without references an image is drawn by the Text2Image DiT. With references (``edit`` or ``continue``,
or ``generate`` that names earlier images) the Video2World DiT is used: the referenced images become
the first frames of a short clip and the frame it predicts after them is the new image. This is
DuoGen's consistency mechanism: the video prior carries identity, layout and style from the earlier
frames into the new one. Both pipelines share the VAE and the T5 text encoder (loaded once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image, ImageOps

from duogen_agents.errors import ModelLoadError
from duogen_agents.models.loading import generating, loading, resolve_device, resolve_dtype, resolve_source
from duogen_agents.presets import ImageSpec

StepCallback = Callable[[int, int], None]


class ImageTool(Protocol):
    """Draws one image; ``references`` are earlier images used as conditioning frames, in order."""

    def draw(
        self,
        prompt: str,
        *,
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> Image.Image: ...


class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
    """Accepts every prompt and frame. For random-weight tests and for users who opt out explicitly."""

    @register_to_config
    def __init__(self) -> None:
        super().__init__()
        # One parameter so that ``.to(device)`` and dtype queries work like on the real checker.
        self._probe = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: Any) -> Any:
        return frames


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


def conditioning_frames(references: Sequence[Image.Image], temporal_factor: int) -> tuple[list[Image.Image], int]:
    """Pad ``references`` to ``1 + k * temporal_factor`` frames (repeating the last one) so that every
    reference lands in a conditioning latent frame, and return them with the clip length to sample:
    one latent frame more than the conditioning."""
    frames = list(references)
    k = math.ceil((len(frames) - 1) / temporal_factor)
    padded = 1 + k * temporal_factor
    frames += [frames[-1]] * (padded - len(frames))
    return frames, padded + temporal_factor


class CosmosImageTool:
    """Cosmos-Predict2 Text2Image + Video2World. Build it with ``from_spec``."""

    def __init__(self, text2image: Any, spec: ImageSpec, video2world_source: str, safety_checker: Any) -> None:
        self.text2image = text2image
        self.spec = spec
        self._video2world: Any = None
        self._video2world_source = video2world_source
        self._safety_checker = safety_checker
        self.calls: list[dict[str, Any]] = []  # what each draw sent to a pipeline (kind, frame count)

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
        return cls(pipe, spec, v2w_source, checker)

    @property
    def video2world(self) -> Any:
        """Loaded on first use, sharing the VAE and text encoder with Text2Image."""
        if self._video2world is None:
            from diffusers import Cosmos2VideoToWorldPipeline

            t2i = self.text2image
            with loading("video image model", self._video2world_source):
                pipe = Cosmos2VideoToWorldPipeline.from_pretrained(
                    self._video2world_source,
                    text_encoder=t2i.text_encoder,
                    tokenizer=t2i.tokenizer,
                    vae=t2i.vae,
                    safety_checker=self._safety_checker,
                    dtype=t2i.transformer.dtype,
                )
                pipe.to(t2i.device)
                pipe.set_progress_bar_config(disable=True)
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
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> Image.Image:
        size = (self.spec.width, self.spec.height)
        with generating("image model"):
            if not references:
                self.calls.append({"pipeline": "text2image", "frames": 0})
                out = self.text2image(**self._common(prompt, seed, on_step))
                return out.images[0].convert("RGB")
            pipe = self.video2world
            fitted = [ImageOps.fit(im.convert("RGB"), size, Image.Resampling.LANCZOS) for im in references]
            frames, num_frames = conditioning_frames(fitted, pipe.vae_scale_factor_temporal)
            self.calls.append({"pipeline": "video2world", "frames": len(references), "num_frames": num_frames})
            out = pipe(video=frames, num_frames=num_frames, fps=self.spec.fps, **self._common(prompt, seed, on_step))
            return out.frames[0][-1].convert("RGB")
