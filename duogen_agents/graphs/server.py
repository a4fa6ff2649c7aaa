"""The turn graph for a LangGraph server (``langgraph dev`` / LangGraph Platform).

``langgraph.json`` at the repository root names ``make_graph``: a factory that builds the graph for
the preset a run asks for (``context["preset"]`` or ``configurable.preset``, else ``$DUOGEN_PRESET``,
else the first of ``$DUOGEN_PRESETS``, else ``tiny``), loading each preset's models once per server process and sharing them between runs
(the library takes model calls in turns per device). A run may choose only among the presets the
operator serves: ``$DUOGEN_PRESETS`` (comma-separated names or preset files) and the default preset; a caller's name loads nothing else (no multi-GB download or preset file of the caller's
choosing). The factory is async and loads in a worker thread, so a server's event loop (health
checks, other runs) is never held by a model load, and ``langgraph dev`` needs no ``--allow-blocking``.
A preset that is loading holds only its own runs. The server's input and output schemas show only
what a caller sends (``messages``, optional ``mode`` and ``seed``) and gets (``messages``, the turn's
``blocks``, ``title``, ``stop_reason``); images go in as standard content blocks and come out as
``file_id`` blocks of the server's image store.
"""

from __future__ import annotations

import dataclasses
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
_loading: dict[str, threading.Lock] = {}  # one per preset: a load holds only that preset's runs
_lock = threading.Lock()  # guards the two dicts, never held during a load


def _listed() -> list[str]:
    return [p.strip() for p in os.environ.get("DUOGEN_PRESETS", "").split(",") if p.strip()]


def default_preset() -> str:
    """A run's preset when it names none: ``$DUOGEN_PRESET``, else the first of ``$DUOGEN_PRESETS``,
    else ``tiny``."""
    return os.environ.get("DUOGEN_PRESET") or next(iter(_listed()), DEFAULT_PRESET)


def served_presets() -> list[str]:
    """What a run may ask for: ``$DUOGEN_PRESETS`` (comma-separated) and the default preset, or the
    default preset alone."""
    listed = _listed()
    default = default_preset()
    return listed if default in listed else [default, *listed]


def agent_for(preset: str) -> Any:
    """One ``Agent`` (one set of loaded models) per preset per process."""
    with _lock:
        agent = _agents.get(preset)
        if agent is not None:
            return agent
        loading = _loading.setdefault(preset, threading.Lock())
    with loading:  # runs of this preset wait for its load; others do not
        with _lock:
            agent = _agents.get(preset)
        if agent is None:
            from duogen_agents.agent import Agent

            agent = Agent.from_preset(preset)
            with _lock:
                _agents[preset] = agent
        return agent


class DuogenContext(TypedDict, total=False):
    """What a run may choose: ``{"preset": "qwen2.5-vl-7b+cosmos2-2b"}`` (run context or configurable),
    one of the presets the server serves (``$DUOGEN_PRESETS``)."""

    preset: str


def chosen_preset(config: RunnableConfig | None) -> str:
    """The run's preset, refused with a one-line ``ConfigError`` unless the server serves it."""
    from duogen_agents.errors import ConfigError

    config = config or {}
    chosen = {**(config.get("configurable") or {}), **(config.get("context") or {})}  # type: ignore[typeddict-item]
    preset = chosen.get("preset") or default_preset()
    served = served_presets()
    if not isinstance(preset, str) or preset not in served:
        raise ConfigError(
            f"preset {str(preset)[:200]!r} is not served here; this server serves: {', '.join(served)} "
            "(its operator lists them in DUOGEN_PRESETS)"
        )
    return preset


def _graph(config: RunnableConfig | None) -> Any:
    from duogen_agents.graphs.turn import build_graph

    agent = agent_for(chosen_preset(config))
    deps = dataclasses.replace(agent.deps, remote_callers=True)  # no file:// images, no paths in events
    graph = build_graph(
        deps, compile=False, input_schema=TurnInput, output_schema=TurnOutput, context_schema=DuogenContext
    )
    return graph.compile()


async def make_graph(config: RunnableConfig) -> Any:
    """The compiled turn graph for the run's preset (the server supplies the checkpointer), built in a
    worker thread: loading models (and importing torch) never blocks the server's event loop."""
    import asyncio

    return await asyncio.to_thread(_graph, config)
