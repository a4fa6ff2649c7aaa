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
    SessionBusyError,
    StorageError,
)
from duogen_agents.presets import Preset, load_preset

if TYPE_CHECKING:
    from duogen_agents.agent import Agent
    from duogen_agents.graphs.turn import build_graph

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
    "SessionBusyError",
    "StorageError",
    "TextBlock",
    "build_graph",
    "load_preset",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing the graph pulls in langgraph; the CLI's --help must stay instant.
    if name == "Agent":
        from duogen_agents.agent import Agent

        return Agent
    if name == "build_graph":
        from duogen_agents.graphs.turn import build_graph

        return build_graph
    raise AttributeError(f"module 'duogen_agents' has no attribute {name!r}")
