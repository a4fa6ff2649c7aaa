"""``start`` resets a turn; ``outline`` commits a visual plan; ``plan`` writes the next action."""

from __future__ import annotations

import re
from typing import Any, Literal

from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from duogen_agents.errors import ConfigError
from duogen_agents.graphs import actions as A
from duogen_agents.graphs import prompts
from duogen_agents.graphs.deps import GraphDeps
from duogen_agents.graphs.nodes.common import (
    budget,
    call_planner,
    capabilities,
    pending_from,
    referable,
    stop,
    text_update,
    writer,
)
from duogen_agents.graphs.state import MODES, RESET_BLOCKS, PendingImage, TurnState
from duogen_agents.validation import MAX_PROMPT_CHARS, MAX_SEED, check_seed, check_text, validation_line

# "Step 3:", "step 3)", "Step 3 -", "Step 3." (a dot or dash only before a space: "Step 1.5 cups" keeps it)
_STEP_PREFIX = re.compile(r"\s*step\s*\d+\s*(?:[:)]|[.\-\u2013\u2014](?=\s)|$)\s*", re.IGNORECASE)


def step_title(title: str) -> str:
    """A plan step's title for the reader's heading ``### Step N: ...``, without a "Step N:" of its own
    (models often number their titles, which gave "### Step 1: Step 1: ...")."""
    return _STEP_PREFIX.sub("", title, count=1).strip() if _STEP_PREFIX.match(title) else title


def step_body(text: str, number: int) -> str:
    """A step's text for the reader, under its heading ``### Step N: ...``, without a leading "Step N:"
    of the same number (the heading has it: "### Step 1: Water\n\nStep 1: Water the pot ...")."""
    found = _STEP_PREFIX.match(text)
    if found is None or re.match(r"\s*step\s*(\d+)", text, re.IGNORECASE).group(1) != str(number):  # type: ignore[union-attr]
        return text
    return text[found.end() :] or text  # nothing but "Step N:" stays as written


def inline_images(state: TurnState, deps: GraphDeps) -> dict[str, Any]:
    """Images that came in as pixels (a parent graph's message with LangChain base64 or URL image
    blocks, OpenAI ``image_url`` parts) are stored once and become ``file_id`` blocks and known
    images, so the planner sees them and can reference them. Returns the state update."""
    from duogen_agents.document import SHORT_ID_LENGTH
    from duogen_agents.inputs import block_file_id, image_from_block, is_image_block
    from duogen_agents.storage.images import is_image_id

    changed: list[Any] = []
    known: dict[str, Any] = {}
    already = state.get("known_images") or {}
    for message in state.get("messages", []):
        if isinstance(message.content, str):
            continue
        # Every image of the conversation is a known image, even where the state that carried the
        # messages (a parent graph's) has no ``known_images``: follow-ups can reference them.
        for block in message.content:
            file_id = block_file_id(block) if isinstance(block, dict) else None
            if file_id is not None and file_id[:SHORT_ID_LENGTH] not in already and is_image_id(file_id):
                known[file_id[:SHORT_ID_LENGTH]] = deps.store.ref(file_id).model_dump()
        blocks = list(message.content)  # any message's: a tool's result may carry the picture it drew
        if not any(is_image_block(b) and block_file_id(b) is None for b in blocks):  # type: ignore[arg-type]
            continue
        new_blocks: list[Any] = []
        for block in blocks:
            if is_image_block(block) and block_file_id(block) is None:  # type: ignore[arg-type]
                ref = _stored_copy(block, deps.store) or deps.store.put(  # type: ignore[arg-type]
                    image_from_block(
                        block,  # type: ignore[arg-type]
                        allow_remote=deps.allow_remote_images,
                        allow_files=not deps.remote_callers,
                    )
                )
                known[ref.short] = ref.model_dump()
                block = {"type": "image", "file_id": ref.id, "mime_type": ref.mime}
            new_blocks.append(block)
        changed.append(message.model_copy(update={"content": new_blocks}))  # same id: replaces it
    update: dict[str, Any] = {"known_images": known} if known else {}
    return {**update, "messages": changed} if changed else update


def _stored_copy(block: dict[str, Any], store: Any) -> Any:
    """The stored picture whose own bytes a base64 block carries (``draw_image``'s result carries its
    PNG), or None: that picture is referenced as it is, not stored again after a decode."""
    import base64
    import binascii
    import hashlib

    from duogen_agents.inputs import block_base64

    data = block_base64(block)
    if data is None:
        return None
    try:
        image_id = hashlib.sha256(base64.b64decode(data, validate=True)).hexdigest()
    except (binascii.Error, ValueError):
        return None  # image_from_block says what is wrong with it
    return store.ref(image_id) if store.exists(image_id) else None


class DirectRequest(BaseModel):
    """A caller's direct image request (``request``: a redraw): a prompt, the rest optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    references: list[str] = Field(default_factory=list, max_length=64)  # ids of earlier images
    kind: Literal["generate", "edit", "continue"] = "generate"
    origin: Literal["generated", "draft"] = "generated"
    step: int | None = Field(default=None, ge=0)
    attempt: int = Field(default=1, ge=1, le=1_000)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)  # the render node sets the drawing's own seed


def direct_request(request: object) -> PendingImage | None:
    """``request`` as the render node takes it, the defaults filled in; a malformed one is a one-line
    ``ConfigError`` (it was a KeyError inside ``render``)."""
    if request is None:
        return None
    shape = "an image request: {'prompt': str} and optionally references, kind, origin, step, attempt, seed"
    if not isinstance(request, dict):
        raise ConfigError(f"request must be {shape}; got {type(request).__name__}")
    try:
        checked = DirectRequest.model_validate(request)
    except ValidationError as e:
        raise ConfigError(f"request.{validation_line(e.errors())}; it must be {shape}") from None
    check_text(checked.prompt, "request.prompt")
    return {**checked.model_dump(), "rejections": []}  # type: ignore[return-value]


def start(state: TurnState, *, deps: GraphDeps | None = None) -> dict[str, Any]:
    """Check what a caller of the graph itself sent (a parent graph, a LangGraph server's client:
    ``Agent`` checked it already) and reset the per-turn bookkeeping; a direct request (a redraw)
    goes straight to ``render``."""
    mode = state.get("mode", "interleaved")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {str(mode)[:100]!r}; choose one of: {', '.join(MODES)}")
    seed = {"seed": 0} if check_seed(state.get("seed")) is None and "seed" in state else {}  # None: the default
    request = direct_request(state.get("request"))
    images = inline_images(state, deps) if deps is not None else {}
    return {
        **images,
        **seed,
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


def outline(state: TurnState, config: RunnableConfig, *, deps: GraphDeps) -> dict[str, Any]:
    """Visual plans: a title and the step titles, at most one step per image the turn may draw."""
    limits, spec = deps.limits, deps.planner_spec
    max_steps = min(limits.plan_max_steps, limits.max_images)
    schema = A.plan_schema(
        min_steps=min(limits.plan_min_steps, max_steps),
        max_steps=max_steps,
        max_title=A.plan_title_chars(spec.max_prompt_chars),
    )
    if (max_new := budget(state, schema, deps)) is None:
        return stop("max_turn_tokens")
    raw, n = call_planner(state, config, deps, schema, prompts.OUTLINE, max_new)
    plan_ = A.parse_action(raw, A.Plan)
    writer()({"event": "plan", "title": plan_.title, "steps": [s.title for s in plan_.steps]})
    summary = plan_.title + "\n" + "\n".join(f"{i + 1}. {s.title}" for i, s in enumerate(plan_.steps))
    return {
        "plan": plan_.model_dump(),
        "title": plan_.title,
        "calls": state.get("calls", 0) + 1,
        "tokens": state.get("tokens", 0) + n,
        "messages": [AIMessage(content=[{"type": "text", "text": summary}])],
    }


def plan(state: TurnState, config: RunnableConfig, *, deps: GraphDeps) -> dict[str, Any]:
    """The next action of the answer, under the mode's grammar; every limit ends the turn here."""
    limits, spec = deps.limits, deps.planner_spec
    mode = state.get("mode", "interleaved")
    refs = referable(state, deps)
    caps = capabilities(deps)
    sizes = {"max_prompt": spec.max_prompt_chars, "max_refs": limits.max_references, "capabilities": caps}
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
        schema = A.step_schema(refs, max_text=spec.max_text_chars, **sizes)
        if (max_new := budget(state, schema, deps)) is None:
            return stop("max_turn_tokens")
        instruction = prompts.STEP.format(number=i + 1, title=steps[i]["title"])
        raw, n = call_planner(state, config, deps, schema, instruction, max_new)
        action = A.parse_action(raw, A.StepAction)
        title = step_title(steps[i]["title"])
        heading = f"### Step {i + 1}: {title}\n\n" if title else f"### Step {i + 1}\n\n"
        # The planner reads back the heading as it always has (its title as written): trained planners
        # (the shapes preset's) learned from that text, and their next pictures follow their states.
        said = f"### Step {i + 1}: {steps[i]['title']}\n\n" + action.text
        return {
            **base,
            **text_update(heading + step_body(action.text, i + 1), step=i, said=said),
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
            refs, max_text=spec.max_text_chars, allow_draft=allow_draft, allow_answer=drafts >= 1, **sizes
        )
        if (max_new := budget(state, schema, deps)) is None:
            return stop("max_turn_tokens")
        instruction = prompts.FIRST_DRAFT if drafts == 0 else prompts.NEXT_DRAFT
        raw, n = call_planner(state, config, deps, schema, instruction, max_new)
        draft_action = A.parse_action(raw, A.DraftOrAnswer)
        upd: dict[str, Any] = {**base, "tokens": state.get("tokens", 0) + n}
        if isinstance(draft_action, A.AnswerAction):
            return {**upd, **text_update(draft_action.text), "answered": True}
        return {**upd, "drafts": drafts + 1, "pending": pending_from(state, draft_action, "draft", None)}
    # interleaved
    schema = A.next_action_schema(
        refs,
        max_text=spec.max_text_chars,
        allow_image=state.get("images", 0) < limits.max_images,
        allow_done=state.get("actions", 0) > 0,
        **sizes,
    )
    if (max_new := budget(state, schema, deps)) is None:
        return stop("max_turn_tokens")
    raw, n = call_planner(state, config, deps, schema, None, max_new)
    action = A.parse_action(raw, A.NextAction)
    upd = {**base, "tokens": state.get("tokens", 0) + n}
    if isinstance(action, A.TextAction):
        return {**upd, **text_update(action.text)}
    if isinstance(action, A.ImageAction):
        return {**upd, "pending": pending_from(state, action, "generated", None)}
    return {**upd, **stop("done")}
