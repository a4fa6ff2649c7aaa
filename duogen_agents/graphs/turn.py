"""The turn graph: wiring only (the nodes live in ``graphs/nodes``).

::

    START -> start -+-> outline (visual-plan) -> plan | finish (no budget left)
                    +-> plan
                    +-> render (a direct request: redraw an image; then finish)
    plan   -> render (an image is due) | plan (text written) | finish (done, or a limit reached)
    render -> check (checks on) | plan
    check  -> revise (rejected, within the redraw budget) | plan
    revise -> render (the planner's revised request, written from the check's note)
    finish -> END

Nodes call the planner as a LangChain chat model (so ``stream_mode="messages"`` yields its tokens)
and the ``Renderer``, and write custom stream events (``stream_mode="custom"``): ``text``,
``image_start``, ``image_progress``, ``image_ready``, ``image_rejected``, ``plan`` and ``finish``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from langgraph.graph import END, START, StateGraph

from duogen_agents.graphs import nodes
from duogen_agents.graphs.deps import GraphDeps
from duogen_agents.graphs.state import TurnState
from duogen_agents.storage.serde import harden

__all__ = ["GraphDeps", "build_graph", "build_state_graph"]


# ---- routing ---------------------------------------------------------------------------------------


def after_start(state: TurnState) -> str:
    if state.get("pending"):
        return "render"
    return "outline" if state.get("mode") == "visual-plan" else "plan"


def after_outline(state: TurnState) -> str:
    return "finish" if state.get("finished") else "plan"


def after_plan(state: TurnState) -> str:
    if state.get("pending"):
        return "render"
    return "finish" if state.get("finished") else "plan"


def after_image(state: TurnState) -> str:
    """Once an image is in the answer: a direct request (a redraw) ends the turn."""
    return "finish" if state.get("direct") else "plan"


def after_render(state: TurnState) -> str:
    return "check" if state.get("candidate") else after_image(state)


def after_check(state: TurnState) -> str:
    return "revise" if state.get("revising") else after_image(state)


def after_revise(state: TurnState) -> str:
    return "render" if state.get("pending") else after_image(state)


NODES = ("start", "outline", "plan", "render", "check", "revise", "finish")


def _wire(node: dict[str, Any], **schemas: Any) -> StateGraph:
    graph = StateGraph(TurnState, **schemas)
    for name in NODES:
        graph.add_node(name, node[name])
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", after_start, ["outline", "plan", "render"])
    graph.add_conditional_edges("outline", after_outline, ["plan", "finish"])
    graph.add_conditional_edges("plan", after_plan, ["render", "plan", "finish"])
    graph.add_conditional_edges("render", after_render, ["check", "plan", "finish"])
    graph.add_conditional_edges("check", after_check, ["revise", "plan", "finish"])
    graph.add_conditional_edges("revise", after_revise, ["render", "plan", "finish"])
    graph.add_edge("finish", END)
    return graph


def build_graph(deps: GraphDeps, *, checkpointer: Any = None, compile: bool = True, **schemas: Any) -> Any:
    """Build the turn graph. ``compile=False`` returns the uncompiled ``StateGraph`` to compose;
    ``input_schema``/``output_schema`` narrow what callers see (``graphs/server.py``)."""
    graph = _wire(
        {
            "start": partial(nodes.start, deps=deps),
            "outline": partial(nodes.outline, deps=deps),
            "plan": partial(nodes.plan, deps=deps),
            "render": partial(nodes.render, deps=deps),
            "check": partial(nodes.check, deps=deps),
            "revise": partial(nodes.revise, deps=deps),
            "finish": nodes.finish,
        },
        **schemas,
    )
    if not compile:
        return graph
    return graph.compile(checkpointer=harden(checkpointer))


def _unused(state: TurnState) -> dict[str, Any]:
    return {}


def build_state_graph(checkpointer: Any) -> Any:
    """A model-free graph over the same state and channels: read, copy or restore a session's state
    without loading a planner or an image tool (``get_state``, ``update_state(..., as_node="finish")``).
    Its nodes do nothing; it is never run."""
    return _wire(dict.fromkeys(NODES, _unused)).compile(checkpointer=harden(checkpointer))
