"""Graph state. It holds ``ImageRef`` dicts and image ids only: no bytes, no base64, no PIL objects.

Checkpoints are full snapshots per step, so pixels in state would grow them without bound. The two
channels that grow with a session (``messages`` and ``known_images``) are LangGraph ``DeltaChannel``s:
a checkpoint stores only what a step wrote, and the value is rebuilt from the writes, so the bytes
per checkpoint stay flat however many turns and images a session holds. ``blocks`` holds the
current turn only (the session records keep earlier turns).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from langchain_core.messages import AnyMessage
from langgraph.channels.delta import DeltaChannel
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

Mode = Literal["interleaved", "visual-plan", "draft"]
MODES: tuple[str, ...] = ("interleaved", "visual-plan", "draft")


RESET_BLOCKS: dict[str, Any] = {"type": "reset"}


def fold_messages(state: list[AnyMessage] | None, writes: Sequence[Any]) -> list[AnyMessage]:
    """``add_messages`` over a batch of writes (what ``DeltaChannel`` replays)."""
    out: list[AnyMessage] = list(state or [])
    for w in writes:
        out = add_messages(out, w)  # type: ignore[assignment]
    return out


def merge_images(state: dict[str, Any] | None, writes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Images are only ever added: a new turn's uploads never hide earlier images."""
    out = dict(state or {})
    for w in writes:
        out.update(w or {})
    return out


def turn_blocks(left: list[dict[str, Any]] | None, right: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append blocks; a write that starts with ``RESET_BLOCKS`` starts a new turn's list."""
    if right and right[0] == RESET_BLOCKS:
        return list(right[1:])
    return [*(left or []), *right]


class Rejection(TypedDict):
    image: dict[str, Any]  # ImageRef dict of the rejected drawing
    prompt: str  # the request it was drawn for
    note: str  # why the check rejected it


class PendingImage(TypedDict, total=False):
    prompt: str
    references: list[str]  # full image ids
    kind: Literal["generate", "edit", "continue"]
    origin: Literal["generated", "draft"]
    step: int | None
    attempt: int
    seed: int
    # Earlier attempts of this request the check rejected, oldest first; the revision is written
    # from the last one's note.
    rejections: list[Rejection]
    # How the candidate was drawn (family, pipeline, frames, horizon), for its image block.
    drawn: dict[str, Any]


# The conversation channel, shared by the state and the server's input/output schemas.
Messages = Annotated[list[AnyMessage], DeltaChannel(fold_messages)]
KnownImages = Annotated[dict[str, dict[str, Any]], DeltaChannel(merge_images)]
Blocks = Annotated[list[dict[str, Any]], turn_blocks]


class TurnState(TypedDict, total=False):
    # Conversation: langchain messages; images are {"type": "image", "file_id": <sha256>} blocks.
    messages: Messages
    # Document blocks (InterleavedDocument block dicts) of the current turn, in order.
    blocks: Blocks
    # Every image of the conversation by short id -> ImageRef dict (uploads, drafts, generated).
    known_images: KnownImages
    mode: Mode
    seed: int
    # Input only: an image request to draw directly (a redraw), without asking the planner:
    # {"prompt": ...} and optionally references, kind, origin, step, attempt and seed; ``start``
    # checks it and fills in the rest (``nodes.plan.direct_request``).
    request: PendingImage | None
    direct: bool
    # Per-turn bookkeeping, reset by the start node.
    title: str | None
    plan: dict[str, Any] | None
    step: int
    pending: PendingImage | None
    candidate: dict[str, Any] | None  # ImageRef dict drawn, awaiting the check
    revising: bool  # the check rejected the candidate: the planner writes the revised request next
    # Images the check rejected this turn (kept: the session records every image it drew).
    rejected: Annotated[list[dict[str, Any]], turn_blocks]
    actions: int
    calls: int
    tokens: int
    images: int
    drafts: int
    answered: bool
    finished: bool
    stop_reason: str | None
