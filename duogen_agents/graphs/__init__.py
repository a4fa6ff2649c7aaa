"""The LangGraph state machine of one turn: plan -> render -> check -> ... -> finish.

``turn.py`` wires it; ``nodes/`` holds the node functions (each importable and testable on its own);
``actions.py`` the schemas the planner decodes; ``prompts.py`` what the planner is told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from duogen_agents.graphs.deps import GraphDeps
    from duogen_agents.graphs.state import Mode, TurnState
    from duogen_agents.graphs.turn import build_graph

__all__ = ["GraphDeps", "Mode", "TurnState", "build_graph"]


def __getattr__(name: str) -> Any:
    if name == "GraphDeps":
        from duogen_agents.graphs.deps import GraphDeps

        return GraphDeps
    if name in ("Mode", "TurnState"):
        from duogen_agents.graphs import state

        return getattr(state, name)
    if name == "build_graph":
        from duogen_agents.graphs.turn import build_graph

        return build_graph
    raise AttributeError(f"module 'duogen_agents.graphs' has no attribute {name!r}")
