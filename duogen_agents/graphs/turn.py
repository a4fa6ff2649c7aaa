"""The turn graph.

::

    START -> start -+-> outline (visual-plan) -> plan | finish (no budget)
                    +-> plan
                    +-> render (a direct request: redraw an image; then finish)
    plan  -> render (an image is due) | plan (text written) | finish (done or a limit reached)
    render -> check (checks on) | plan
    check  -> revise (rejected, within the redraw budget) | plan
    revise -> render (the planner's revised request, from the check's note)
    finish -> END

Nodes are thin: they call the planner (as a LangChain chat model, so ``stream_mode="messages"`` yields
its tokens) and the ``Renderer``, and write custom stream events (``stream_mode="custom"``):
``{"event": "text", ...}``, ``image_start``, ``image_progress``, ``image_ready``, ``image_rejected``,
``plan`` and ``finish``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph

from duogen_agents.document import ImageBlock, ImageRef, TextBlock
from duogen_agents.graphs.state import RESET_BLOCKS, PendingImage, TurnState
from duogen_agents.models import actions as A
from duogen_agents.models.chat_model import PlannerChatModel
from duogen_agents.presets import Limits, PlannerSpec
from duogen_agents.storage.images import ImageStore
from duogen_agents.storage.serde import harden
from duogen_agents.tools.render import Renderer

SYSTEM_PROMPTS = {
    "interleaved": (
        "You write illustrated answers, one action at a time, as JSON. Write a text chunk "
        '({"type": "text"}), ask for an image where a picture helps ({"type": "image"} with a prompt, '
        "the ids of earlier images it must stay consistent with, and kind generate, edit or continue), "
        'or finish ({"type": "done"}). Images appear as [image <id>].'
    ),
    "visual-plan": (
        "You make visual plans: first a title and 2 to 8 step titles, then for each step its text and "
        "one image. Keep people, objects and places consistent by referencing earlier images by id."
    ),
    "draft": (
        "Before answering, sketch a draft image to think with, look at it, and sketch again if it helps; "
        "then write the answer. Drafts are for you; the answer is for the user."
    ),
}


@dataclass
class GraphDeps:
    """What the nodes call: the planner (as a chat model), the renderer and the limits."""

    chat: PlannerChatModel
    renderer: Renderer
    store: ImageStore
    planner_spec: PlannerSpec
    limits: Limits


def _writer() -> Any:
    try:
        return get_stream_writer()
    except Exception:  # called outside a graph run (unit tests of a node)
        return lambda _event: None


def _refs(state: TurnState) -> dict[str, ImageRef]:
    return {k: ImageRef.model_validate(v) for k, v in (state.get("known_images") or {}).items()}


def _pick_refs(known: dict[str, ImageRef], limit: int) -> list[str]:
    """The short ids the planner may reference: the most recent ``limit * 4`` images."""
    return list(known)[-limit * 4 :]


def build_graph(deps: GraphDeps, *, checkpointer: Any = None, compile: bool = True) -> Any:
    """Build the turn graph. ``compile=False`` returns the uncompiled ``StateGraph`` to compose."""
    limits = deps.limits
    spec = deps.planner_spec

    def budget(state: TurnState, schema: dict[str, Any]) -> int | None:
        """``max_new_tokens`` for a call under ``schema``, or None when what is left of the turn's
        token budget cannot hold a whole action (the turn then ends; a call is never cut mid-action)."""
        remaining = limits.max_turn_tokens - state.get("tokens", 0)
        if remaining < A.max_action_tokens(schema):
            return None
        return min(spec.max_new_tokens, remaining)

    def call_planner(
        state: TurnState,
        config: RunnableConfig,
        schema: dict[str, Any],
        instruction: str | None,
        max_new_tokens: int,
        images: Sequence[str] = (),
    ) -> tuple[str, int]:
        mode = state.get("mode", "interleaved")
        msgs: list[BaseMessage] = [SystemMessage(content=SYSTEM_PROMPTS[mode]), *state.get("messages", [])]
        if instruction is not None:
            content: list[Any] = [{"type": "image", "file_id": i} for i in images]
            content.append({"type": "text", "text": instruction})
            msgs.append(HumanMessage(content=content))
        calls = state.get("calls", 0)
        response = deps.chat.invoke(
            msgs, config, schema=schema, seed=state.get("seed", 0) * 7919 + calls, max_new_tokens=max_new_tokens
        )
        usage = response.usage_metadata or {}
        return str(response.content), int(usage.get("output_tokens", 0))

    def stop(reason: str) -> dict[str, Any]:
        return {"finished": True, "stop_reason": reason}

    def text_update(state: TurnState, text: str, step: int | None = None) -> dict[str, Any]:
        block = TextBlock(text=text, step=step)
        _writer()({"event": "text", "text": text, "step": step})
        return {"blocks": [block.model_dump()], "messages": [AIMessage(content=[{"type": "text", "text": text}])]}

    def pending_from(state: TurnState, req: A.ImageRequest, origin: str, step: int | None) -> PendingImage:
        known = _refs(state)
        full = [r.id for r in Renderer.resolve(req.references, known)]
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

    # ---- nodes ---------------------------------------------------------------------------------

    def start(state: TurnState) -> dict[str, Any]:
        request = state.get("request")
        return {
            "request": None,
            "direct": request is not None,
            "blocks": [RESET_BLOCKS],
            "rejected": [RESET_BLOCKS],
            "title": None,
            "plan": None,
            "step": 0,
            "pending": request,
            "candidate": None,
            "revising": False,
            "actions": 0,
            "calls": 0,
            "tokens": 0,
            "images": 0,
            "drafts": 0,
            "answered": False,
            "finished": False,
            "stop_reason": None,
        }

    def outline(state: TurnState, config: RunnableConfig) -> dict[str, Any]:
        # One image per step: a plan never has more steps than the turn may draw images.
        max_steps = min(limits.plan_max_steps, limits.max_images)
        schema = A.plan_schema(
            min_steps=min(limits.plan_min_steps, max_steps),
            max_steps=max_steps,
            max_title=A.plan_title_chars(spec.max_prompt_chars),
        )
        if (max_new := budget(state, schema)) is None:
            return stop("max_turn_tokens")
        raw, n = call_planner(state, config, schema, "Write the plan: a title and the step titles.", max_new)
        plan = A.parse_action(raw, A.Plan)
        _writer()({"event": "plan", "title": plan.title, "steps": [s.title for s in plan.steps]})
        summary = plan.title + "\n" + "\n".join(f"{i + 1}. {s.title}" for i, s in enumerate(plan.steps))
        return {
            "plan": plan.model_dump(),
            "title": plan.title,
            "calls": state.get("calls", 0) + 1,
            "tokens": state.get("tokens", 0) + n,
            "messages": [AIMessage(content=[{"type": "text", "text": summary}])],
        }

    def plan(state: TurnState, config: RunnableConfig) -> dict[str, Any]:
        mode = state.get("mode", "interleaved")
        known = _refs(state)
        refs = _pick_refs(known, limits.max_references)
        base = {"calls": state.get("calls", 0) + 1, "actions": state.get("actions", 0) + 1}
        if state.get("actions", 0) >= limits.max_actions:
            return stop("max_actions")
        if mode == "visual-plan":
            steps = (state.get("plan") or {}).get("steps", [])
            i = state.get("step", 0)
            if i >= len(steps):
                return stop("plan_complete")
            if state.get("images", 0) >= limits.max_images:
                return stop("max_images")
            schema = A.step_schema(
                refs, max_text=spec.max_text_chars, max_prompt=spec.max_prompt_chars, max_refs=limits.max_references
            )
            if (max_new := budget(state, schema)) is None:
                return stop("max_turn_tokens")
            raw, n = call_planner(state, config, schema, f"Write step {i + 1}: {steps[i]['title']}", max_new)
            action = A.parse_action(raw, A.StepAction)
            heading = f"### Step {i + 1}: {steps[i]['title']}\n\n"
            return {
                **base,
                **text_update(state, heading + action.text, step=i),
                "tokens": state.get("tokens", 0) + n,
                "step": i + 1,
                "pending": pending_from(state, action.image, "generated", i),
            }
        if mode == "draft":
            if state.get("answered"):
                return stop("answered")
            drafts = state.get("drafts", 0)
            allow_draft = drafts < limits.max_drafts and state.get("images", 0) < limits.max_images
            if not allow_draft and drafts == 0:
                return stop("max_images")
            schema = A.draft_schema(
                refs,
                max_text=spec.max_text_chars,
                max_prompt=spec.max_prompt_chars,
                max_refs=limits.max_references,
                allow_draft=allow_draft,
                allow_answer=drafts >= 1,
            )
            if (max_new := budget(state, schema)) is None:
                return stop("max_turn_tokens")
            instruction = "Sketch a draft." if drafts == 0 else "Look at your draft: sketch again, or answer."
            raw, n = call_planner(state, config, schema, instruction, max_new)
            draft_action = A.parse_action(raw, A.DraftOrAnswer)
            upd: dict[str, Any] = {**base, "tokens": state.get("tokens", 0) + n}
            if isinstance(draft_action, A.AnswerAction):
                return {**upd, **text_update(state, draft_action.text), "answered": True}
            return {**upd, "drafts": drafts + 1, "pending": pending_from(state, draft_action, "draft", None)}
        # interleaved
        schema = A.next_action_schema(
            refs,
            max_text=spec.max_text_chars,
            max_prompt=spec.max_prompt_chars,
            max_refs=limits.max_references,
            allow_image=state.get("images", 0) < limits.max_images,
            allow_done=state.get("actions", 0) > 0,
        )
        if (max_new := budget(state, schema)) is None:
            return stop("max_turn_tokens")
        raw, n = call_planner(state, config, schema, None, max_new)
        action = A.parse_action(raw, A.NextAction)
        upd = {**base, "tokens": state.get("tokens", 0) + n}
        if isinstance(action, A.TextAction):
            return {**upd, **text_update(state, action.text)}
        if isinstance(action, A.ImageAction):
            return {**upd, "pending": pending_from(state, action, "generated", None)}
        return {**upd, **stop("done")}

    def render(state: TurnState) -> dict[str, Any]:
        pending = state["pending"]
        assert pending is not None
        write = _writer()
        seed = state.get("seed", 0) * 1_000_003 + state.get("images", 0) * 101 + pending["attempt"]
        index = state.get("images", 0) + 1
        write(
            {
                "event": "image_start",
                "index": index,
                "prompt": pending["prompt"],
                "origin": pending["origin"],
                "attempt": pending["attempt"],
                "references": pending["references"],
            }
        )

        def on_step(step: int, total: int) -> None:
            write({"event": "image_progress", "index": index, "step": step, "total": total})

        known = _refs(state)
        refs = Renderer.resolve(pending["references"], known)
        ref = deps.renderer.render(pending["prompt"], refs, seed=seed, on_step=on_step)
        pending = {**pending, "seed": seed}
        if limits.check:
            return {"candidate": ref.model_dump(), "pending": pending}
        return accept(state, pending, ref)

    def accept(state: TurnState, pending: PendingImage, ref: ImageRef) -> dict[str, Any]:
        block = ImageBlock(
            image=ref,
            prompt=pending["prompt"],
            kind=pending["kind"],
            references=pending["references"],
            origin=pending["origin"],
            step=pending["step"],
            seed=pending["seed"],
            attempts=pending["attempt"],
            rejected=[
                {"image": r["image"], "prompt": r["prompt"], "note": r["note"]} for r in pending.get("rejections") or []
            ],
        )
        known = {ref.short: ref.model_dump()}
        _writer()(
            {
                "event": "image_ready",
                "index": state.get("images", 0) + 1,
                "image": ref.model_dump(),
                "path": str(deps.store.path(ref.id)),
                "prompt": pending["prompt"],
                "origin": pending["origin"],
                "step": pending["step"],
            }
        )
        note = "Draft sketch" if pending["origin"] == "draft" else "Image"
        message = AIMessage(
            content=[
                {"type": "text", "text": f"{note}: {pending['prompt']}"},
                {"type": "image", "file_id": ref.id, "mime_type": ref.mime},
            ]
        )
        return {
            "blocks": [block.model_dump()],
            "messages": [message],
            "known_images": known,
            "images": state.get("images", 0) + 1,
            "pending": None,
            "candidate": None,
        }

    def check(state: TurnState, config: RunnableConfig) -> dict[str, Any]:
        pending = state["pending"]
        candidate = ImageRef.model_validate(state["candidate"])
        assert pending is not None
        schema = A.check_schema()
        if (max_new := budget(state, schema)) is None:
            return accept(state, pending, candidate)  # no budget left to look: keep it unchecked
        instruction = (
            f"This image was drawn for the request: {pending['prompt']!r}. "
            "Does it match? Answer ok, or redraw with a short note saying what is wrong."
        )
        raw, n = call_planner(state, config, schema, instruction, max_new, images=[candidate.id])
        verdict = A.parse_action(raw, A.CheckVerdict)
        upd: dict[str, Any] = {"calls": state.get("calls", 0) + 1, "tokens": state.get("tokens", 0) + n}
        if verdict.verdict == "redraw" and pending["attempt"] <= limits.redraw_budget:
            _writer()(
                {
                    "event": "image_rejected",
                    "image": candidate.model_dump(),
                    "note": verdict.note,
                    "attempt": pending["attempt"],
                }
            )
            rejection = {"image": candidate.model_dump(), "prompt": pending["prompt"], "note": verdict.note}
            rejected = {**pending, "image": candidate.model_dump(), "note": verdict.note}
            return {
                **upd,
                "rejected": [rejected],
                "pending": {**pending, "rejections": [*(pending.get("rejections") or []), rejection]},
                "revising": True,
            }
        return {**upd, **accept(state, pending, candidate)}

    def revise(state: TurnState, config: RunnableConfig) -> dict[str, Any]:
        """The planner sees the rejected image and the check's note and writes the revised request:
        a new prompt and/or other references and kind (not the same request with another seed)."""
        pending = state["pending"]
        assert pending is not None
        candidate = ImageRef.model_validate(state["candidate"])
        last = (pending.get("rejections") or [{}])[-1]
        known = _refs(state)
        schema = A.revise_schema(
            _pick_refs(known, limits.max_references), max_prompt=spec.max_prompt_chars, max_refs=limits.max_references
        )
        if (max_new := budget(state, schema)) is None:
            return {"revising": False, **accept(state, pending, candidate)}
        instruction = (
            f"This image, drawn for {pending['prompt']!r}, was rejected: {last.get('note') or 'it does not match'}. "
            "Write the revised image request: change the prompt, and the references or kind if they were wrong."
        )
        raw, n = call_planner(state, config, schema, instruction, max_new, images=[candidate.id])
        request = A.parse_action(raw, A.ImageRequest)
        revised = pending_from(state, request, pending["origin"], pending["step"])
        return {
            "calls": state.get("calls", 0) + 1,
            "tokens": state.get("tokens", 0) + n,
            "revising": False,
            "candidate": None,
            "pending": {**revised, "attempt": pending["attempt"] + 1, "rejections": pending.get("rejections") or []},
        }

    def finish(state: TurnState) -> dict[str, Any]:
        blocks = state.get("blocks") or []
        _writer()({"event": "finish", "stop_reason": state.get("stop_reason"), "blocks": len(blocks)})
        return {"finished": True}

    # ---- routing -------------------------------------------------------------------------------

    def after_start(state: TurnState) -> str:
        if state.get("pending"):
            return "render"
        return "outline" if state.get("mode") == "visual-plan" else "plan"

    def next_after_image(state: TurnState) -> str:
        return "finish" if state.get("direct") else "plan"

    def after_plan(state: TurnState) -> str:
        if state.get("pending"):
            return "render"
        if state.get("finished"):
            return "finish"
        return "plan"

    def after_render(state: TurnState) -> str:
        return "check" if state.get("candidate") else next_after_image(state)

    def after_check(state: TurnState) -> str:
        return "revise" if state.get("revising") else next_after_image(state)

    def after_revise(state: TurnState) -> str:
        return "render" if state.get("pending") else next_after_image(state)

    def after_outline(state: TurnState) -> str:
        return "finish" if state.get("finished") else "plan"

    graph = StateGraph(TurnState)
    graph.add_node("start", start)
    graph.add_node("outline", outline)
    graph.add_node("plan", plan)
    graph.add_node("render", render)
    graph.add_node("check", check)
    graph.add_node("revise", revise)
    graph.add_node("finish", finish)
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", after_start, ["outline", "plan", "render"])
    graph.add_conditional_edges("outline", after_outline, ["plan", "finish"])
    graph.add_conditional_edges("plan", after_plan, ["render", "plan", "finish"])
    graph.add_conditional_edges("render", after_render, ["check", "plan", "finish"])
    graph.add_conditional_edges("check", after_check, ["revise", "plan", "finish"])
    graph.add_conditional_edges("revise", after_revise, ["render", "plan", "finish"])
    graph.add_edge("finish", END)
    if not compile:
        return graph
    return graph.compile(checkpointer=harden(checkpointer))


def build_state_graph(checkpointer: Any) -> Any:
    """A model-free graph over the same state: read, copy or restore a session's state without loading
    a planner or an image tool (``get_state``, ``update_state(..., as_node="finish")``)."""
    graph = StateGraph(TurnState)
    graph.add_node("start", lambda state: {})
    graph.add_node("finish", lambda state: {})
    graph.add_edge(START, "start")
    graph.add_edge("start", "finish")
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=harden(checkpointer))
