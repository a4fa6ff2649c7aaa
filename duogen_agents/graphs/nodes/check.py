"""``check`` looks at a new image against its request; ``revise`` turns a rejection into a new request.

A rejected image goes back to the planner with the check's note, and the planner writes the revised
request (a new prompt, other references or another kind), within ``limits.redraw_budget``. The check
runs on the preset's ``critic`` when it names one, else on the planner.
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import RunnableConfig

from duogen_agents.document import ImageRef
from duogen_agents.graphs import actions as A
from duogen_agents.graphs import prompts
from duogen_agents.graphs.deps import GraphDeps
from duogen_agents.graphs.nodes.common import (
    CHECK_TAG,
    budget,
    call_planner,
    capabilities,
    pending_from,
    referable,
    writer,
)
from duogen_agents.graphs.nodes.render import accept
from duogen_agents.graphs.state import TurnState


def check(state: TurnState, config: RunnableConfig, *, deps: GraphDeps) -> dict[str, Any]:
    pending = state["pending"]
    candidate = ImageRef.model_validate(state["candidate"])
    assert pending is not None
    schema = A.check_schema()
    if (max_new := budget(state, schema, deps)) is None:
        return accept(state, pending, candidate, deps=deps)  # no budget left to look: kept unchecked
    instruction = prompts.CHECK.format(prompt=pending["prompt"])
    raw, n = call_planner(
        state, config, deps, schema, instruction, max_new, images=[candidate.id], chat=deps.checker, tag=CHECK_TAG
    )
    verdict = A.parse_action(raw, A.CheckVerdict)
    upd: dict[str, Any] = {"calls": state.get("calls", 0) + 1, "tokens": state.get("tokens", 0) + n}
    if verdict.verdict == "redraw" and pending["attempt"] <= deps.limits.redraw_budget:
        writer()(
            {
                "event": "image_rejected",
                "image": candidate.model_dump(),
                "note": verdict.note,
                "attempt": pending["attempt"],
            }
        )
        rejection = {"image": candidate.model_dump(), "prompt": pending["prompt"], "note": verdict.note}
        return {
            **upd,
            "rejected": [{**pending, "image": candidate.model_dump(), "note": verdict.note}],
            "pending": {**pending, "rejections": [*(pending.get("rejections") or []), rejection]},
            "revising": True,
        }
    return {**upd, **accept(state, pending, candidate, deps=deps)}


def revise(state: TurnState, config: RunnableConfig, *, deps: GraphDeps) -> dict[str, Any]:
    """The planner sees the rejected image and the note, and writes the revised request (not the same
    request with another seed)."""
    pending = state["pending"]
    assert pending is not None
    candidate = ImageRef.model_validate(state["candidate"])
    last = (pending.get("rejections") or [{}])[-1]
    schema = A.revise_schema(
        referable(state, deps),
        max_prompt=deps.planner_spec.max_prompt_chars,
        max_refs=deps.limits.max_references,
        capabilities=capabilities(deps),
    )
    if (max_new := budget(state, schema, deps)) is None:
        return {"revising": False, **accept(state, pending, candidate, deps=deps)}
    instruction = prompts.REVISE.format(prompt=pending["prompt"], note=last.get("note") or "it does not match")
    raw, n = call_planner(state, config, deps, schema, instruction, max_new, images=[candidate.id])
    revised = pending_from(state, A.parse_action(raw, A.ImageRequest), pending["origin"], pending["step"])
    return {
        "calls": state.get("calls", 0) + 1,
        "tokens": state.get("tokens", 0) + n,
        "revising": False,
        "candidate": None,
        "pending": {**revised, "attempt": pending["attempt"] + 1, "rejections": pending.get("rejections") or []},
    }
