"""The turn graph for a LangGraph server (``langgraph dev`` / LangGraph Platform).

``langgraph.json`` at the repository root names ``make_graph``: a factory that builds the graph for
the preset a run asks for (``config["configurable"]["preset"]``, else ``$DUOGEN_PRESET``, else
``tiny``), loading each preset's models once per server process and sharing them between runs (the
library takes model calls in turns per device). The server's input and output schemas show only
what a caller sends (``messages``, optional ``mode`` and ``seed``) and gets (``messages``, the turn's
``blocks``, ``title``, ``stop_reason``); images go in as standard content blocks and come out as
``file_id`` blocks of the server's image store.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from langchain_core.runnables import RunnableConfig
from typing_extensions import TypedDict

from duogen_agents.graphs.state import Blocks, Messages, Mode

DEFAULT_PRESET = "tiny"


class TurnInput(TypedDict, total=False):
    messages: Messages
    mode: Mode
    seed: int


class TurnOutput(TypedDict, total=False):
    messages: Messages
    blocks: Blocks
    title: str | None
    stop_reason: str | None


_agents: dict[str, Any] = {}
_lock = threading.Lock()


def agent_for(preset: str) -> Any:
    """One ``Agent`` (one set of loaded models) per preset per process."""
    with _lock:
        agent = _agents.get(preset)
        if agent is None:
            from duogen_agents.agent import Agent

            agent = _agents[preset] = Agent.from_preset(preset)
        return agent


class DuogenContext(TypedDict, total=False):
    """What a run may choose: ``{"preset": "qwen2.5-vl-7b+cosmos2-2b"}`` (run context or configurable)."""

    preset: str


def make_graph(config: RunnableConfig) -> Any:
    """The compiled turn graph for the run's preset (the server supplies the checkpointer)."""
    from duogen_agents.graphs.turn import build_graph

    config = config or {}
    chosen = {**(config.get("configurable") or {}), **(config.get("context") or {})}  # type: ignore[typeddict-item]
    preset = chosen.get("preset") or os.environ.get("DUOGEN_PRESET") or DEFAULT_PRESET
    agent = agent_for(str(preset))
    graph = build_graph(
        agent.deps, compile=False, input_schema=TurnInput, output_schema=TurnOutput, context_schema=DuogenContext
    )
    return graph.compile()
