"""duogen-agents: interleaved text-and-image generation with LangGraph, transformers and diffusers.

Public API (imports of torch, transformers and diffusers happen only when a model is loaded):

- ``Agent``: ``Agent.from_preset("tiny").run(prompt, mode="visual-plan")`` returns a document.
- ``build_graph``: the turn's LangGraph ``StateGraph`` (compiled, or uncompiled to compose).
- ``InterleavedDocument``, ``ImageRef``: the answer and the image references it holds.
- ``load_preset``, ``Preset``: named or file presets.
- the exception tree rooted at ``DuogenError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from duogen_agents.document import ImageBlock, ImageRef, InterleavedDocument, TextBlock
from duogen_agents.errors import (
    ConfigError,
    DuogenError,
    GenerationError,
    InputImageError,
    ModelLoadError,
    PromptTooLongError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    SessionStateError,
    StorageError,
    UnsafeCheckpointError,
)
from duogen_agents.presets import Preset, load_preset

if TYPE_CHECKING:
    from duogen_agents.agent import Agent
    from duogen_agents.graphs.turn import build_graph
    from duogen_agents.sessions import Session, Sessions

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "ConfigError",
    "DuogenError",
    "GenerationError",
    "ImageBlock",
    "ImageRef",
    "InputImageError",
    "InterleavedDocument",
    "ModelLoadError",
    "Preset",
    "PromptTooLongError",
    "Session",
    "SessionBusyError",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionStateError",
    "Sessions",
    "StorageError",
    "TextBlock",
    "UnsafeCheckpointError",
    "build_graph",
    "load_preset",
]

_LAZY = {
    "Agent": "duogen_agents.agent",
    "build_graph": "duogen_agents.graphs.turn",
    "Session": "duogen_agents.sessions",
    "Sessions": "duogen_agents.sessions",
}


def __getattr__(name: str) -> Any:
    # Lazy: the graph pulls in langgraph, the models torch/transformers/diffusers (only when built).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'duogen_agents' has no attribute {name!r}")
