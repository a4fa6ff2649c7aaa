"""The two model roles as small protocols, importable without torch, transformers or diffusers.

- ``Planner``: continues a conversation (text and images) under a JSON-schema grammar.
- ``ImageTool``: draws one image for a request of a given kind, with earlier images as references.

Image requests mean what they say, for every image family:

============  ===============  =====================================================================
kind          references       meaning
============  ===============  =====================================================================
generate      none             text-to-image
generate      1 or more        a new picture that keeps the referenced subjects
edit          1 or more        the first reference changed as the prompt says, everything else kept
continue      1 or more        the next moment of the referenced scene
============  ===============  =====================================================================

A family says which kinds it can do with how many references (``ImageTool.capabilities``); the
planner's grammar offers only those, and a request outside them is refused with a clear error.
References come oldest first, and are letterboxed to the canvas, never cropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict

from PIL import Image

ImageKind = Literal["generate", "edit", "continue"]
KINDS: tuple[ImageKind, ...] = ("generate", "edit", "continue")

StepCallback = Callable[[int, int], None]
# Gets each piece of text as it is decoded. Returning ``True`` (exactly: any other value, ``None``
# or a ``write``'s count, goes on) asks the planner to end decoding there: a chat model's stop
# sequence has appeared, so the tokens after it would be decoded only to be thrown away.
TokenCallback = Callable[[str], object]


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ImagePart(TypedDict):
    type: Literal["image"]
    image: Image.Image


class ChatTurn(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: list[TextPart | ImagePart]


@dataclass
class PlannerOutput:
    text: str
    num_tokens: int
    prompt_tokens: int = 0
    prefill_tokens: int | None = None  # prompt tokens computed by this call (the rest came from a cache)
    forced_tokens: int = 0  # of num_tokens, those the grammar forced (jump forward: not sampled)
    # ended by the grammar, an end-of-turn token or the caller (``on_token`` returned True), not cut
    # by a token budget
    complete: bool = True


class Planner(Protocol):
    """Anything that continues a conversation under a JSON-schema grammar."""

    def generate(
        self,
        conversation: Sequence[ChatTurn],
        schema: dict[str, Any],
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        on_token: TokenCallback | None = None,
        cache_key: str | None = None,
        client_schema: bool = False,
    ) -> PlannerOutput:
        """``cache_key`` names the session the call belongs to; a planner may keep state per key
        (the local planner keeps the KV cache of the conversation) and must give the same output
        with or without it. ``on_token`` gets the text as it is decoded; when it returns ``True``
        the planner ends decoding there (a planner may decode a few more tokens first, and one that
        cannot stop early decodes on: the caller cuts the text itself). ``client_schema``:
        ``schema`` came from a client (a server's ``response_format``), not from the library, and is
        decoded without shortcuts that trust it (the local planner's jump forward)."""
        ...


@dataclass(frozen=True)
class Drawing:
    """One drawn image and how it was made (recorded in the document's image block)."""

    image: Image.Image
    family: str
    pipeline: str
    frames: int = 0  # conditioning frames the pipeline received
    horizon: int | None = None  # for ``continue``: frames between the last reference and the image
    details: Mapping[str, Any] = field(default_factory=dict)


class ImageTool(Protocol):
    """Draws one image. ``references`` are earlier images, oldest first.

    ``capabilities`` maps each kind the tool can draw *with references* to the most references it
    takes; ``generate`` without references is always possible. ``draw`` may return a ``Drawing`` or
    a plain PIL image (then recorded as family ``custom``)."""

    capabilities: Mapping[str, int]

    def draw(
        self,
        prompt: str,
        *,
        kind: ImageKind = "generate",
        references: Sequence[Image.Image] = (),
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> Drawing | Image.Image: ...


def refusal(capabilities: Mapping[str, int], kind: str, n_refs: int) -> str | None:
    """Why a tool with ``capabilities`` cannot draw ``kind`` with ``n_refs`` references, or None."""
    if kind not in KINDS:
        return f"unknown image kind {kind!r}; use generate, edit or continue"
    if n_refs == 0:
        return None if kind == "generate" else f"{kind} needs at least one reference image"
    most = capabilities.get(kind, 0)
    if most == 0:
        can = ", ".join(f"{k} (up to {v})" for k, v in capabilities.items() if v) or "none"
        return f"this image model cannot {kind} with references; kinds with references it can do: {can}"
    if n_refs > most:
        return f"{kind} takes at most {most} reference image(s) with this image model, not {n_refs}"
    return None


def letterbox(image: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Resize ``image`` to fit ``size`` (width, height) keeping its aspect, padding the rest: never a crop."""
    image = image.convert("RGB")
    w, h = size
    scale = min(w / image.width, h / image.height)
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new("RGB", size, fill)
    canvas.paste(image.resize(inner, Image.Resampling.LANCZOS), ((w - inner[0]) // 2, (h - inner[1]) // 2))
    return canvas
