"""Graph state. It holds ``ImageRef`` dicts and image ids only: no bytes, no base64, no PIL objects.

Checkpoints are full snapshots per step, so pixels in state would grow them without bound.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

Mode = Literal["interleaved", "visual-plan", "draft"]
MODES: tuple[str, ...] = ("interleaved", "visual-plan", "draft")


class PendingImage(TypedDict):
    prompt: str
    references: list[str]  # full image ids
    kind: Literal["generate", "edit", "continue"]
    origin: Literal["generated", "draft"]
    step: int | None
    attempt: int
    seed: int


class TurnState(TypedDict, total=False):
    # Conversation: langchain messages; images are {"type": "image", "file_id": <sha256>} blocks.
    messages: Annotated[list[AnyMessage], add_messages]
    # Document blocks (InterleavedDocument block dicts) of every turn in this thread, in order.
    blocks: Annotated[list[dict[str, Any]], operator.add]
    # Every image of the conversation by short id -> ImageRef dict (uploads, drafts, generated).
    known_images: dict[str, dict[str, Any]]
    mode: Mode
    seed: int
    # Per-turn bookkeeping, reset by the start node.
    turn_start: int  # index in ``blocks`` where this turn's blocks begin
    title: str | None
    plan: dict[str, Any] | None
    step: int
    pending: PendingImage | None
    candidate: dict[str, Any] | None  # ImageRef dict drawn, awaiting the check
    actions: int
    calls: int
    tokens: int
    images: int
    drafts: int
    answered: bool
    finished: bool
    stop_reason: str | None
