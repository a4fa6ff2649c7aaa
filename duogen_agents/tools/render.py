"""Rendering an image request: resolve references, draw, store, return an ``ImageRef``.

``Renderer`` is what the graph's render node calls; ``Renderer.as_langchain_tool()`` exposes the same
operation to other agents as a LangChain ``StructuredTool`` that returns image ids, never pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, Field

from duogen_agents.document import ImageRef
from duogen_agents.errors import GenerationError
from duogen_agents.graphs.actions import ANY_KIND
from duogen_agents.models.protocols import Drawing, ImageKind, ImageTool, StepCallback, refusal
from duogen_agents.storage.images import ImageStore


@dataclass(frozen=True)
class Rendered:
    """A stored drawing and how it was made."""

    ref: ImageRef
    drawing: Drawing

    def record(self) -> dict[str, Any]:
        """The fields an image block records about its drawing."""
        d = self.drawing
        out: dict[str, Any] = {"family": d.family, "pipeline": d.pipeline, "frames": d.frames, "horizon": d.horizon}
        if "first_block_cache" in d.details:
            out["first_block_cache"] = dict(d.details["first_block_cache"])
        return out


class RenderImageArgs(BaseModel):
    """Arguments of the image tool as other agents call it."""

    prompt: str = Field(min_length=1, max_length=2000, description="what to draw")
    references: list[str] = Field(
        default_factory=list, max_length=16, description="ids (full or short) of earlier images to keep consistent with"
    )
    kind: Literal["generate", "edit", "continue"] = "generate"
    seed: int = 0


class Renderer:
    def __init__(self, tool: ImageTool, store: ImageStore) -> None:
        self.tool = tool
        self.store = store

    @staticmethod
    def resolve(references: Sequence[str], known: Mapping[str, ImageRef]) -> list[ImageRef]:
        """Map full or short ids to known ``ImageRef``s, in order, without duplicates."""
        out: list[ImageRef] = []
        for r in references:
            match = known.get(r[:12])
            if match is None or not match.id.startswith(r):
                raise GenerationError(f"image reference {r!r} names no earlier image of this conversation")
            if match not in out:
                out.append(match)
        return out

    def resolve_ids(self, references: Sequence[str], known: Mapping[str, ImageRef]) -> list[ImageRef]:
        """Like ``resolve``, and an id the store holds resolves too: the ids a tool returned earlier
        (in this conversation or another) are content hashes, so a caller can only name an image it
        was given. Keeps no state, so one tool may serve many conversations and threads at once."""
        out: list[ImageRef] = []
        for r in references:
            match = known.get(r[:12])
            if match is None or not match.id.startswith(r):
                match = self.store.find(r)
            if match is None:
                raise GenerationError(f"image reference {r!r} names no earlier image")
            if match not in out:
                out.append(match)
        return out

    @property
    def capabilities(self) -> Mapping[str, int]:
        """Kinds the tool draws with references, and how many (every kind if it does not say)."""
        return getattr(self.tool, "capabilities", ANY_KIND)

    def render(
        self,
        prompt: str,
        references: Sequence[ImageRef] = (),
        *,
        kind: ImageKind = "generate",
        seed: int = 0,
        on_step: StepCallback | None = None,
        session: str | None = None,
    ) -> Rendered:
        """Draw and store one image; references are given oldest first. A kind or a number of
        references the tool cannot take raises ``GenerationError`` (the planner's grammar never
        offers them; other callers get the reason)."""
        if problem := refusal(self.capabilities, kind, len(references)):
            raise GenerationError(problem)
        frames = [self.store.open(r) for r in references]
        extra = {"session": session} if getattr(self.tool, "wants_session", False) else {}
        out = self.tool.draw(prompt, kind=kind, references=frames, seed=seed, on_step=on_step, **extra)
        drawing = (
            out if isinstance(out, Drawing) else Drawing(image=out, family="custom", pipeline=type(self.tool).__name__)
        )
        if not isinstance(drawing.image, Image.Image):
            raise GenerationError(f"the image tool returned {type(drawing.image).__name__}, not an image")
        return Rendered(self.store.put(drawing.image), drawing)

    def as_langchain_tool(self, known: Mapping[str, ImageRef] | None = None) -> Any:
        """A ``StructuredTool`` named ``draw_image``: its content is a line of text and the image as
        a standard base64 block (a calling model sees the picture), its artifact the image's id and
        size. A bad reference or a request the model cannot draw comes back as a tool error the
        calling model can read, not an exception."""
        from langchain_core.tools import StructuredTool, ToolException

        scope: dict[str, ImageRef] = dict(known or {})  # read-only: the tool keeps no state between calls

        def draw_image(
            prompt: str, references: list[str] | None = None, kind: str = "generate", seed: int = 0
        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            try:
                refs = self.resolve_ids(references or [], scope)
                ref = self.render(prompt, refs, kind=kind, seed=seed).ref  # type: ignore[arg-type]
            except GenerationError as e:
                raise ToolException(str(e)) from None
            text = f"image {ref.short} ({ref.width}x{ref.height}, {kind}); reference it by that id"
            artifact = {"id": ref.id, "short_id": ref.short, "width": ref.width, "height": ref.height, "kind": kind}
            return [{"type": "text", "text": text}, ref.content_block(self.store)], artifact

        return StructuredTool.from_function(
            func=draw_image,
            name="draw_image",
            description="Draw an image from a prompt; pass earlier image ids as references to keep them consistent.",
            args_schema=RenderImageArgs,
            response_format="content_and_artifact",
            handle_tool_error=True,
        )
