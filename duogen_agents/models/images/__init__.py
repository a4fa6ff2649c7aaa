"""Image families behind the ``ImageTool`` protocol, and the tool a preset asks for.

``build_image_tool(spec)`` loads the family named by ``spec.family`` (Cosmos-Predict2, FLUX.2
[klein]), or, with ``backend = "openai-images"``, talks to an OpenAI Images endpoint instead
(``remote.OpenAIImagesTool``); with ``spec.references`` it routes the kinds the first cannot draw with
references to the second (``RoutedImageTool``). Importing this package imports no model library;
building a local tool does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from duogen_agents.errors import GenerationError
from duogen_agents.models.protocols import Drawing, ImageKind, StepCallback, refusal
from duogen_agents.presets import ImageSpec


def fresh_scheduler(pipe: Any) -> None:
    """Every pipeline call starts from a new scheduler: its step index and timesteps are per-call
    state, which two calls sharing one scheduler would corrupt."""
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)


def compile_dit(transformer: Any) -> bool:
    """Regional ``torch.compile``: each repeated transformer block is compiled once and reused, which
    compiles in a fraction of a whole-model compile for the same speed (diffusers'
    ``compile_repeated_blocks`` where the model names its blocks; Cosmos does not, so its
    ``transformer_blocks`` are compiled one by one). On a GPU only: elsewhere compiling costs more
    than it saves, and the DiT stays eager (returns False). It compiles on the first draw of each
    shape (README "Speed and memory" gives the cost measured on an H200)."""
    device = next(transformer.parameters()).device
    if device.type != "cuda":
        return False
    if getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=True)
        return True
    for block in getattr(transformer, "transformer_blocks", []):
        block.compile(fullgraph=True)
    return True


def vae_tiling(vae: Any, on: bool) -> None:
    """``image.vae_tiling``: the VAE encodes and decodes in overlapping tiles (diffusers'
    ``enable_tiling``; pictures at or under one tile, 256 pixels a side for Wan, are done whole)."""
    if on:
        vae.enable_tiling()


def first_block_cache(transformer: Any, threshold: float) -> Any:
    """Attach a First Block Cache (``step_cache``) to ``transformer`` when ``threshold`` > 0 (after
    ``compile_dit``: the compiled blocks stay compiled); returns it, or None."""
    if threshold <= 0:
        return None
    from duogen_agents.models.images.step_cache import FirstBlockCache

    return FirstBlockCache.attach(transformer, threshold)


def cache_counts(transformer: Any) -> dict[str, Any]:
    """For a drawing's details, once the draw is done: the threshold and how many DiT calls ran every
    block or the first only since the last ``reset`` (empty without a cache). The cache's kept tensors
    are freed."""
    cache = getattr(transformer, "_first_block_cache", None)
    if cache is None:
        return {}
    cache.release()
    return {"first_block_cache": {"threshold": cache.threshold, **cache.counts()}}


def reset_cache(transformer: Any) -> None:
    cache = getattr(transformer, "_first_block_cache", None)
    if cache is not None:
        cache.reset()


def build_family(spec: ImageSpec, models_dir: Path | None) -> Any:
    if spec.backend == "openai-images":
        from duogen_agents.models.images.remote import OpenAIImagesTool

        return OpenAIImagesTool.from_spec(spec)
    from duogen_agents.models.loading import quiet_libraries  # imports torch: local models only

    quiet_libraries()
    if spec.family == "aligned":
        from duogen_agents.models.images.aligned import AlignedImageTool

        return AlignedImageTool.from_spec(spec)
    if spec.family == "flux2-klein":
        from duogen_agents.models.images.flux2_klein import Flux2KleinImageTool

        return Flux2KleinImageTool.from_spec(spec, models_dir)
    from duogen_agents.models.images.cosmos2 import CosmosImageTool

    return CosmosImageTool.from_spec(spec, models_dir)


class RoutedImageTool:
    """A main family plus the family that draws what the main one cannot do with references."""

    def __init__(self, main: Any, references: Any) -> None:
        self.main = main
        self.references = references
        caps = dict(references.capabilities)
        caps.update({k: v for k, v in main.capabilities.items() if v})
        self.capabilities: Mapping[str, int] = caps

    def route(self, kind: str, n_refs: int) -> Any:
        """The family that draws ``kind`` with ``n_refs`` references."""
        if n_refs == 0 or refusal(self.main.capabilities, kind, n_refs) is None:
            return self.main
        return self.references

    def draw(
        self,
        prompt: str,
        *,
        kind: ImageKind = "generate",
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> Drawing | Image.Image:
        if problem := refusal(self.capabilities, kind, len(references)):
            raise GenerationError(problem)
        tool = self.route(kind, len(references))
        return tool.draw(prompt, kind=kind, references=references, seed=seed, on_step=on_step)


def build_image_tool(spec: ImageSpec, models_dir: Path | None = None) -> Any:
    """The preset's image tool; the references family draws on the main family's canvas."""
    main = build_family(spec, models_dir)
    if spec.references is None:
        return main
    canvas = {"height": spec.height, "width": spec.width}
    return RoutedImageTool(main, build_family(spec.references.model_copy(update=canvas), models_dir))
