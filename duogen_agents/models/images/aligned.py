"""The ``aligned`` image family: the DiT and connector of ``duogen train stage2`` (DuoGen's trained path).

At an image request it takes the planner's hidden states over the image prompt it wrote (its last
call in the session: the conversation and the action that asked for the picture, run through the
frozen planner) through the connector as the DiT's context (a prompt-only folder, trained with
``--context t5``, reads a frozen T5 encoder's states over the prompt text instead), and the last reference picture as the conditioning frame (a blank
frame for the first picture, or when ``image.frames = false``). It draws at the size it was trained
on and is resized to the preset's canvas. With the planner's states the prompt text is not read again: the states carry it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from duogen_agents.errors import GenerationError, ModelLoadError
from duogen_agents.models.images import cache_counts, first_block_cache, reset_cache, vae_tiling
from duogen_agents.models.loading import generating, loading
from duogen_agents.models.protocols import Drawing, ImageKind, StepCallback, refusal
from duogen_agents.models.serial import device_turn
from duogen_agents.presets import ImageSpec


class AlignedImageTool:
    family = "aligned"
    capabilities: Mapping[str, int] = {"generate": 1, "edit": 1, "continue": 1}
    wants_session = True  # the Renderer passes the session, to find the planner's last call

    def __init__(self, vae: Any, transformer: Any, connector: Any, meta: dict[str, Any], spec: ImageSpec) -> None:
        self.vae, self.transformer, self.connector, self.meta, self.spec = vae, transformer, connector, meta, spec
        self.planner: Any = None
        self.device = "cpu"
        self.text_encoder: Any = None
        self.text_tokenizer: Any = None

    @classmethod
    def from_spec(cls, spec: ImageSpec) -> AlignedImageTool:
        from duogen_agents.training.stage2 import load_aligned

        folder = Path(str(spec.model)).expanduser()
        if not (folder / "aligned.json").is_file():
            raise ModelLoadError(f"image.model {folder}: not the aligned folder of `duogen train stage2`")
        with loading("aligned image model", str(folder)):
            vae, transformer, connector, meta = load_aligned(folder)
            if spec.strength < 1.0 and connector.aux is None:
                raise ModelLoadError(
                    f"image.strength {spec.strength} needs a connector with a regression head; {folder} was "
                    "trained with --regression 0 (use strength = 1.0)"
                )
            if spec.keep > 0 and (connector.aux is None or connector.config.get("aux_target") != "delta"):
                raise ModelLoadError(
                    f"image.keep {spec.keep} needs a connector whose regression head predicts the change "
                    f"(aux_target delta); {folder}'s does not (use keep = 0)"
                )
            first_block_cache(transformer, spec.first_block_cache)
            vae_tiling(vae, spec.vae_tiling)
            tool = cls(vae, transformer, connector, meta, spec)
            if meta.get("context", "planner") == "t5":
                from duogen_agents.training.stage2 import load_text_encoder

                tool.text_encoder, tool.text_tokenizer = load_text_encoder(folder)
        return tool

    def attach_planner(self, planner: Any) -> None:
        """The planner whose states this family was trained on (``Agent.from_preset`` does this)."""
        self.planner = planner

    def draw(
        self,
        prompt: str,
        *,
        kind: ImageKind = "generate",
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        on_step: StepCallback | None = None,
        session: str | None = None,
    ) -> Drawing:
        from duogen_agents.training.data import PlannerExample
        from duogen_agents.training.stage2 import planner_states, sample, text_encoder_states

        if problem := refusal(self.capabilities, kind, len(references)):
            raise GenerationError(problem)
        size, tokens = int(self.meta["size"]), int(self.meta["tokens"])
        reference = references[-1] if references and self.spec.frames else None
        if self.text_encoder is not None:
            with device_turn(self.device), generating("aligned image model"):
                states, mask = text_encoder_states(self.text_encoder, self.text_tokenizer, prompt, tokens)
        else:
            if self.planner is None or not hasattr(self.planner, "last_calls"):
                raise GenerationError("the aligned image family needs the local planner it was trained with")
            call = self.planner.last_calls.get("" if session is None else session)
            if call is None:
                raise GenerationError("the aligned image family draws only at a planner's image request")
            conversation, action = call
            with device_turn(self.planner.device), generating("planner"):
                if getattr(self.planner, "residency_role", None) is not None:
                    from duogen_agents.models.residency import residency_for

                    residency_for(self.planner.device).use(self.planner.residency_role)
                states, mask = planner_states(self.planner, PlannerExample(conversation, action), tokens)
        with device_turn(self.device), generating("aligned image model"):
            reset_cache(self.transformer)
            picture = sample(
                self.transformer, self.vae, self.connector, states, reference, mask=mask,
                size=size, steps=self.spec.steps, seed=seed, on_step=on_step, start=self.spec.strength,
                keep=self.spec.keep,
            )  # fmt: skip
            details = cache_counts(self.transformer)
        return Drawing(
            picture.resize((self.spec.width, self.spec.height), Image.BILINEAR),
            self.family,
            "aligned-dit",
            frames=1 if reference is not None else 0,
            details=details,
        )
