"""The LangGraph state machine of one turn: plan -> render -> check -> ... -> finish."""

from duogen_agents.graphs.state import Mode, TurnState
from duogen_agents.graphs.turn import GraphDeps, build_graph

__all__ = ["GraphDeps", "Mode", "TurnState", "build_graph"]
