"""The interleaved answer: ``ImageRef`` and ``InterleavedDocument``.

An ``ImageRef`` names an image in the content-addressed store by the sha256 of its PNG bytes; it is
what graph state, checkpoints and documents hold, never the pixels themselves.

>>> ref = ImageRef(id="ab" * 32, width=64, height=64)
>>> ref.short
'abababababab'
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from duogen_agents.storage.images import ImageStore

SHORT_ID_LENGTH = 12


class ImageRef(BaseModel):
    """A reference to one PNG in the image store (no pixels)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the PNG bytes")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    mime: Literal["image/png"] = "image/png"

    @property
    def short(self) -> str:
        """The short id the planner sees and uses in ``references``."""
        return self.id[:SHORT_ID_LENGTH]

    @property
    def filename(self) -> str:
        return f"{self.id}.png"

    def content_block(self, store: ImageStore) -> dict[str, Any]:
        """A LangChain standard image block with the PNG inline (base64): any chat model that takes
        images accepts it, unlike a ``file_id`` only this store resolves."""
        data = base64.b64encode(store.read_bytes(self)).decode("ascii")
        return {"type": "image", "base64": data, "mime_type": self.mime}

    def data_url(self, store: ImageStore) -> str:
        """The PNG as a ``data:`` URL (OpenAI ``image_url`` parts, HTML)."""
        return f"data:{self.mime};base64," + base64.b64encode(store.read_bytes(self)).decode("ascii")


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str
    step: int | None = Field(default=None, description="visual-plan step index (0-based)")


class RejectedImage(BaseModel):
    """A drawing the check turned down; the next attempt was revised from its note."""

    image: ImageRef
    prompt: str
    note: str = ""


class ImageBlock(BaseModel):
    type: Literal["image"] = "image"
    image: ImageRef
    prompt: str
    kind: Literal["generate", "edit", "continue"] = "generate"
    references: list[str] = Field(default_factory=list, description="full ids of conditioning images")
    origin: Literal["generated", "draft", "upload"] = "generated"
    step: int | None = None
    seed: int | None = None
    attempts: int = 1
    rejected: list[RejectedImage] = Field(default_factory=list, description="earlier attempts the check rejected")
    family: str | None = Field(default=None, description="image family that drew it (cosmos2, flux2-klein, ...)")
    pipeline: str | None = Field(default=None, description="the pipeline within the family (text2image, ...)")
    frames: int | None = Field(default=None, description="conditioning frames the pipeline received")
    horizon: int | None = Field(default=None, description="continue: frames between the last reference and it")
    first_block_cache: dict[str, int | float] | None = Field(
        default=None,
        description="image.first_block_cache: its threshold, and the DiT calls that ran every block (computed) "
        "or the first only (skipped)",
    )

    @property
    def draft(self) -> bool:
        return self.origin == "draft"


Block = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class InterleavedDocument(BaseModel):
    """One answer: text and images in the order they were written.

    ``title`` is set in visual-plan mode. ``preset`` names the preset that wrote it, so a reader can
    tell a tiny-preset (noise) document from a real one.
    """

    prompt: str
    mode: Literal["interleaved", "visual-plan", "draft"]
    preset: str
    title: str | None = None
    blocks: list[Block] = Field(default_factory=list)
    inputs: list[ImageRef] = Field(default_factory=list, description="images the user attached")

    @property
    def images(self) -> list[ImageBlock]:
        return [b for b in self.blocks if isinstance(b, ImageBlock)]

    @property
    def text(self) -> str:
        return "\n\n".join(b.text for b in self.blocks if isinstance(b, TextBlock))

    def content_blocks(self, store: ImageStore, *, drafts: bool = False) -> list[dict[str, Any]]:
        """The answer as LangChain standard content blocks, text and base64 images in order, to hand
        to any other chat model (``HumanMessage(content=doc.content_blocks(store))``). Draft sketches
        are left out unless ``drafts``."""
        out: list[dict[str, Any]] = []
        for block in self.blocks:
            if isinstance(block, TextBlock):
                out.append({"type": "text", "text": block.text})
            elif drafts or not block.draft:
                out.append(block.image.content_block(store))
        return out
