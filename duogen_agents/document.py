"""The interleaved answer: ``ImageRef`` and ``InterleavedDocument``.

An ``ImageRef`` names an image in the content-addressed store by the sha256 of its PNG bytes; it is
what graph state, checkpoints and documents hold, never the pixels themselves.

>>> ref = ImageRef(id="ab" * 32, width=64, height=64)
>>> ref.short
'abababababab'
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

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
