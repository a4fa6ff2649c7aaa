"""FLUX.2 [klein] (diffusers ``Flux2KleinPipeline``): text-to-image, and multi-reference generate and
edit in one call (the references are the pipeline's ``image`` list, oldest first).

``edit`` passes the image to change first; ``generate`` with references keeps their subjects;
``continue`` is drawn the same way, as "the next moment" of the referenced scene: FLUX has no motion
model, so this is reference-conditioned generation, not a video prediction (Cosmos does that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from duogen_agents.errors import GenerationError, ModelLoadError
from duogen_agents.models.images import compile_dit, fresh_scheduler, vae_tiling
from duogen_agents.models.loading import generating, loading, resolve_device, resolve_dtype, resolve_source
from duogen_agents.models.protocols import Drawing, ImageKind, StepCallback, letterbox, refusal
from duogen_agents.models.serial import device_turn
from duogen_agents.presets import ImageSpec

CONTINUE_PROMPT = "The next moment of the scene in the reference images: {prompt}"


class Flux2KleinImageTool:
    """FLUX.2 [klein]. Build it with ``from_spec``."""

    family = "flux2-klein"

    def __init__(self, pipe: Any, spec: ImageSpec) -> None:
        self.pipe = pipe
        self.spec = spec
        most = spec.max_references
        self.capabilities: Mapping[str, int] = {"generate": most, "edit": most, "continue": most}
        self.device = str(pipe.device)  # where it runs, also while offloaded to the CPU
        self.residency: Any = None  # set by residency.offload_image_tool (preset offload)

    def offload_roles(self) -> dict[str, list[Any]]:
        return {f"flux2-klein:{id(self)}": [self.pipe.text_encoder, self.pipe.transformer, self.pipe.vae]}

    @classmethod
    def from_spec(cls, spec: ImageSpec, models_dir: Path | None = None) -> Flux2KleinImageTool:
        from diffusers import Flux2KleinPipeline

        assert spec.model is not None
        if spec.model.startswith("tiny:"):
            from duogen_agents.models.tiny import ensure_tiny_flux2_klein

            if models_dir is None:
                raise ModelLoadError("the tiny image tool needs a models cache directory")
            with loading("tiny image tool", spec.model):
                source = str(ensure_tiny_flux2_klein(models_dir))
        else:
            source = resolve_source(spec.model, "image model")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        with loading("image model", source):
            pipe = Flux2KleinPipeline.from_pretrained(source, dtype=dtype)
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            vae_tiling(pipe.vae, spec.vae_tiling)
            if spec.compile:
                compile_dit(pipe.transformer)
        return cls(pipe, spec)

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
        spec = self.spec
        size = (spec.width, spec.height)
        images = [letterbox(im, size) for im in references] or None
        text = CONTINUE_PROMPT.format(prompt=prompt) if kind == "continue" else prompt

        def _callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, spec.steps)
            return kwargs

        with device_turn(self.device), generating("image model"):
            if self.residency is not None:
                self.residency.use(f"flux2-klein:{id(self)}")
            fresh_scheduler(self.pipe)
            out = self.pipe(
                image=images,
                prompt=text,
                height=spec.height,
                width=spec.width,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                max_sequence_length=spec.max_sequence_length,
                callback_on_step_end=_callback,
            )
        pipeline = "flux2-klein" if images is None else "flux2-klein-references"
        return Drawing(out.images[0].convert("RGB"), self.family, pipeline, frames=len(references))
