"""What the nodes share: the stream writer, image lookups, the token budget and the planner call."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer

from duogen_agents.document import ImageRef, TextBlock
from duogen_agents.errors import PromptTooLongError
from duogen_agents.graphs import actions as A
from duogen_agents.graphs.deps import GraphDeps
from duogen_agents.graphs.prompts import SYSTEM_PROMPTS
from duogen_agents.graphs.state import PendingImage, TurnState
from duogen_agents.tools.render import Renderer

log = logging.getLogger("duogen.graph")

# The planner may reference the most recent images only: this many per allowed reference.
RECENT_IMAGES_PER_REFERENCE = 4
# Sessions whose trimmed history the graph remembers (how many oldest turns their last call left out).
MAX_TRIMMED_SESSIONS = 1024
# Spreads the per-call seeds of one turn apart.
CALL_SEED_STRIDE = 7919
# Tags of the model calls in a LangGraph ``messages`` stream: the answer's actions, and the checks.
PLANNER_TAG = "duogen:planner"
CHECK_TAG = "duogen:check"


def writer() -> Any:
    try:
        return get_stream_writer()
    except Exception:  # called outside a graph run (a node under test)
        return lambda _event: None


def known_refs(state: TurnState) -> dict[str, ImageRef]:
    return {k: ImageRef.model_validate(v) for k, v in (state.get("known_images") or {}).items()}


def referable(state: TurnState, deps: GraphDeps) -> list[str]:
    """The short ids the planner may reference: the most recent images, oldest first."""
    return list(known_refs(state))[-deps.limits.max_references * RECENT_IMAGES_PER_REFERENCE :]


def stop(reason: str) -> dict[str, Any]:
    return {"finished": True, "stop_reason": reason}


def budget(state: TurnState, schema: dict[str, Any], deps: GraphDeps) -> int | None:
    """``max_new_tokens`` for a call under ``schema``, or None when what is left of the turn's
    token budget cannot hold a whole action (the turn then ends: a call is never cut mid-action)."""
    remaining = deps.limits.max_turn_tokens - state.get("tokens", 0)
    if remaining < A.max_action_tokens(schema):
        return None
    return min(deps.planner_spec.max_new_tokens, remaining)


def call_planner(
    state: TurnState,
    config: RunnableConfig,
    deps: GraphDeps,
    schema: dict[str, Any],
    instruction: str | None,
    max_new_tokens: int,
    *,
    images: Sequence[str] = (),
    chat: Any = None,
    tag: str = PLANNER_TAG,
) -> tuple[str, int]:
    """One grammar-constrained call over the conversation (plus ``instruction`` with ``images``).

    A session longer than the planner's context leaves out its oldest whole turns, as few as fit
    (the system prompt and this turn always stay). How many is remembered per session and kind of
    call (the planner's actions, the checks: another model, another context), and the next such
    call starts there: the session only grows, so it needs at least as many (a refused attempt may
    cost a whole decode). A turn that does not fit alone is the planner's ``PromptTooLongError``."""
    mode = state.get("mode", "interleaved")
    history = list(state.get("messages", []))
    extra: list[BaseMessage] = []
    if instruction is not None:
        content: list[Any] = [{"type": "image", "file_id": i} for i in images]
        content.append({"type": "text", "text": instruction})
        extra.append(HumanMessage(content=content))
    seed = state.get("seed", 0) * CALL_SEED_STRIDE + state.get("calls", 0)
    # Tagged, so a LangGraph ``messages`` stream can tell the planner's JSON actions (and the
    # check's verdicts) from a parent graph's own model output.
    tagged = {**config, "tags": [*(config.get("tags") or []), tag]}
    # The session's id names its kept KV cache: the next call prefills only what this turn added.
    session = (config.get("configurable") or {}).get("thread_id")
    turns = [i for i, m in enumerate(history) if isinstance(m, HumanMessage)]  # where each turn begins
    most = max(len(turns) - 1, 0)  # earlier turns that may be left out
    # Start where this kind of call last needed to, or from none when the history has shrunk since
    # (a cancelled turn).
    key = (session, tag)
    last, length = deps.dropped_turns.get(key, (0, 0))
    dropped = min(last, most) if length <= len(history) else 0
    while True:
        kept = history[turns[dropped] :] if dropped else history
        msgs: list[BaseMessage] = [SystemMessage(content=SYSTEM_PROMPTS[mode]), *kept, *extra]
        try:
            response = (chat or deps.chat).invoke(
                msgs, tagged, schema=schema, seed=seed, max_new_tokens=max_new_tokens, cache_key=session
            )
            break
        except PromptTooLongError as e:
            if dropped >= most:
                if most:
                    raise PromptTooLongError(f"{e} (this turn alone; the session's earlier turns were left out)") from e
                raise
            dropped += 1
            log.info("session %s: its oldest %d turn(s) left out of the planner's context", session, dropped)
    if session is not None and (dropped or key in deps.dropped_turns):
        deps.dropped_turns.pop(key, None)
        deps.dropped_turns[key] = (dropped, len(history))
        while len(deps.dropped_turns) > MAX_TRIMMED_SESSIONS:  # the least recently trimmed first
            deps.dropped_turns.pop(next(iter(deps.dropped_turns), None), None)
    usage = response.usage_metadata or {}
    return str(response.content), int(usage.get("output_tokens", 0))


def text_update(text: str, step: int | None = None, said: str | None = None) -> dict[str, Any]:
    """``text`` as the document's block and the stream's event; ``said`` (default: ``text``) as the
    message the planner reads back in its next calls, where it differs from what the reader sees."""
    block = TextBlock(text=text, step=step)
    writer()({"event": "text", "text": text, "step": step})
    message = AIMessage(content=[{"type": "text", "text": text if said is None else said}])
    return {"blocks": [block.model_dump()], "messages": [message]}


def pending_from(state: TurnState, req: A.ImageRequest, origin: str, step: int | None) -> PendingImage:
    """An image request as the render node takes it; references resolved to full ids, oldest first
    (the order the images were made, whatever order the planner wrote them in), except that an
    ``edit`` keeps the image it changes (the planner's first reference) first."""
    known = known_refs(state)
    order = {ref.id: i for i, ref in enumerate(known.values())}
    resolved = [r.id for r in Renderer.resolve(req.references, known)]
    head = resolved[:1] if req.kind == "edit" else []
    full = head + sorted((r for r in resolved if r not in head), key=order.__getitem__)
    return {
        "prompt": req.prompt,
        "references": full,
        "kind": req.kind,
        "origin": origin,  # type: ignore[typeddict-item]
        "step": step,
        "attempt": 1,
        "seed": 0,
        "rejections": [],
    }


def capabilities(deps: GraphDeps) -> dict[str, int]:
    return dict(deps.renderer.capabilities)
