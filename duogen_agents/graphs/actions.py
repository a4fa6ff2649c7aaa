"""What the planner may write, as JSON schemas compiled into decoding grammars.

Each planner call is constrained by one of these schemas (xgrammar), so even a random-weight model
yields a well-formed action. Strings are ``{"pattern": "^c+$", "maxLength": N}``: the pattern admits
printable characters and the JSON escapes ``\\n``, ``\\t``, ``\\"``, ``\\\\`` and ``\\/`` (xgrammar 0.2.8
lets control characters through a plain ``maxLength`` string), and it repeats with ``+``, not
``{1,N}``: a bounded repeat defeats xgrammar's precomputed token masks (about 68 ms of mask time per
token with a 151k vocabulary, against a few ms). The local planner drops such ``maxLength`` from the
grammar and enforces it while decoding (``models/decoding.py``); other backends read it as JSON schema.

Image references are an ``enum`` of the short ids of images that exist in the conversation, so the
planner cannot reference an image that does not exist.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from duogen_agents.errors import GenerationError
from duogen_agents.models.protocols import ImageKind

# A JSON-string body: printable characters (no C0/C1 controls, quote or backslash) or a simple escape.
_CHAR = r'(?:[^"\\\x00-\x1f\x7f-\x9f]|\\[nt"\\/])'
_LINE_CHAR = r'(?:[^"\\\x00-\x1f\x7f-\x9f]|\\["\\/])'


def text_schema(max_chars: int, multiline: bool = True) -> dict[str, Any]:
    char = _CHAR if multiline else _LINE_CHAR
    return {"type": "string", "pattern": f"^{char}+$", "maxLength": max_chars}


# ---- parsed actions ---------------------------------------------------------------------------


class ImageRequest(BaseModel):
    prompt: str
    references: list[str] = Field(default_factory=list, description="short ids of earlier images")
    kind: ImageKind = "generate"


class TextAction(BaseModel):
    type: Literal["text"]
    text: str


class ImageAction(ImageRequest):
    type: Literal["image"]


class DoneAction(BaseModel):
    type: Literal["done"]


class PlanStep(BaseModel):
    title: str


class Plan(BaseModel):
    title: str
    steps: list[PlanStep]


class StepAction(BaseModel):
    text: str
    image: ImageRequest


class DraftAction(ImageRequest):
    type: Literal["draft"]


class AnswerAction(BaseModel):
    type: Literal["answer"]
    text: str


class CheckVerdict(BaseModel):
    verdict: Literal["ok", "redraw"]
    note: str = ""


# ---- schema builders ---------------------------------------------------------------------------


Capabilities = Mapping[str, int]
# A tool that does not say what it can do is offered every kind (up to the preset's max_references).
ANY_KIND: dict[str, int] = {"generate": 16, "edit": 16, "continue": 16}


def _image_request_variants(
    refs: list[str], max_prompt: int, max_refs: int, type_const: str | None, capabilities: Capabilities
) -> list[dict[str, Any]]:
    """One object schema per allowed (kinds, number of references) shape: ``generate`` without
    references always, and each kind the image tool can draw with references, up to its maximum."""
    head: dict[str, Any] = {"type": {"const": type_const}} if type_const else {}
    required = (["type"] if type_const else []) + ["prompt", "references", "kind"]
    prompt = text_schema(max_prompt, multiline=False)

    def variant(references: dict[str, Any], kind: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {**head, "prompt": prompt, "references": references, "kind": kind},
            "required": required,
            "additionalProperties": False,
        }

    variants = [variant({"type": "array", "maxItems": 0}, {"const": "generate"})]
    by_max: dict[int, list[str]] = {}
    for kind in ("generate", "edit", "continue"):
        most = min(capabilities.get(kind, 0), max_refs, len(refs))
        if most > 0:
            by_max.setdefault(most, []).append(kind)
    for most, kinds in sorted(by_max.items()):
        references = {"type": "array", "items": {"enum": refs}, "minItems": 1, "maxItems": most}
        variants.append(variant(references, {"enum": kinds} if len(kinds) > 1 else {"const": kinds[0]}))
    return variants


def _const_object(type_name: str, **props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"type": {"const": type_name}, **props},
        "required": ["type", *props],
        "additionalProperties": False,
    }


def next_action_schema(
    refs: list[str],
    *,
    max_text: int,
    max_prompt: int,
    max_refs: int,
    allow_image: bool,
    allow_done: bool,
    capabilities: Capabilities = ANY_KIND,
) -> dict[str, Any]:
    """Interleaved mode: a text chunk, an image request, or done."""
    options = [_const_object("text", text=text_schema(max_text))]
    if allow_image:
        options += _image_request_variants(refs, max_prompt, max_refs, "image", capabilities)
    if allow_done:
        options.append(_const_object("done"))
    return {"anyOf": options} if len(options) > 1 else options[0]


def plan_schema(*, min_steps: int, max_steps: int, max_title: int) -> dict[str, Any]:
    """Visual-plan mode: commit to a title and 2..N step titles first."""
    title = text_schema(max_title, multiline=False)
    return {
        "type": "object",
        "properties": {
            "title": title,
            "steps": {
                "type": "array",
                "minItems": min_steps,
                "maxItems": max_steps,
                "items": {
                    "type": "object",
                    "properties": {"title": title},
                    "required": ["title"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["title", "steps"],
        "additionalProperties": False,
    }


def step_schema(
    refs: list[str], *, max_text: int, max_prompt: int, max_refs: int, capabilities: Capabilities = ANY_KIND
) -> dict[str, Any]:
    """Visual-plan mode: one step's text and its (mandatory) image."""
    return {
        "type": "object",
        "properties": {
            "text": text_schema(max_text),
            "image": {"anyOf": _image_request_variants(refs, max_prompt, max_refs, None, capabilities)},
        },
        "required": ["text", "image"],
        "additionalProperties": False,
    }


def draft_schema(
    refs: list[str],
    *,
    max_text: int,
    max_prompt: int,
    max_refs: int,
    allow_draft: bool,
    allow_answer: bool,
    capabilities: Capabilities = ANY_KIND,
) -> dict[str, Any]:
    """Draft mode: sketch (again), or answer in text having looked at the sketches."""
    options: list[dict[str, Any]] = []
    if allow_draft:
        options += _image_request_variants(refs, max_prompt, max_refs, "draft", capabilities)
    if allow_answer:
        options.append(_const_object("answer", text=text_schema(max_text)))
    return {"anyOf": options} if len(options) > 1 else options[0]


def revise_schema(
    refs: list[str], *, max_prompt: int, max_refs: int, capabilities: Capabilities = ANY_KIND
) -> dict[str, Any]:
    """After a rejected image: the revised request (a new prompt and/or other references and kind)."""
    return {"anyOf": _image_request_variants(refs, max_prompt, max_refs, None, capabilities)}


CHECK_NOTE_CHARS = 120
PLAN_TITLE_CHARS = 80


def plan_title_chars(max_prompt: int) -> int:
    """Plan and step titles are headings: at most ``PLAN_TITLE_CHARS``, and no longer than a prompt."""
    return min(max_prompt, PLAN_TITLE_CHARS)


def check_schema(*, max_note: int = CHECK_NOTE_CHARS) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"verdict": {"enum": ["ok", "redraw"]}, "note": text_schema(max_note, multiline=False)},
        "required": ["verdict", "note"],
        "additionalProperties": False,
    }


# ---- how many tokens an action can take ---------------------------------------------------------

_BOUNDED = re.compile(r"\{1,(\d+)\}\$$")  # an older schema's (or a caller's) bounded repeat
# Separators as xgrammar may emit them without free whitespace: ", " and ": " at most.
_SEP = 2
# One character of a string body is at most four tokens: a byte-level BPE may spend a token per
# UTF-8 byte of an emoji or a rare CJK character (an escape such as \" is two ASCII characters).
TOKENS_PER_CHAR = 4


def max_json_chars(schema: dict[str, Any]) -> int:
    """The most tokens the JSON text ``schema`` admits can take: structure and keys count one token
    per character (ASCII), each string character ``TOKENS_PER_CHAR``. A call given this many new
    tokens (plus one for the end token) always completes its action."""
    if "anyOf" in schema:
        return max(max_json_chars(s) for s in schema["anyOf"])
    if "const" in schema:
        return len(json.dumps(schema["const"]))
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        if "maxLength" in schema:
            return TOKENS_PER_CHAR * int(schema["maxLength"]) + 2
        m = _BOUNDED.search(schema.get("pattern", ""))
        if m is None:
            raise ValueError(f"unbounded string schema: {schema}")
        return TOKENS_PER_CHAR * int(m.group(1)) + 2
    if kind == "array":
        n = int(schema.get("maxItems", 0))
        item = max_json_chars(schema["items"]) if n else 0
        return 2 + n * item + max(0, n - 1) * _SEP
    if kind == "object":
        props = schema.get("properties", {})
        body = sum(len(json.dumps(k)) + _SEP + max_json_chars(v) for k, v in props.items())
        return 2 + body + max(0, len(props) - 1) * _SEP
    raise ValueError(f"cannot bound schema {schema}")


def max_action_tokens(schema: dict[str, Any]) -> int:
    """Tokens to reserve for one planner call under ``schema``: the whole action and its end token."""
    return max_json_chars(schema) + 1


def worst_case_schemas(
    *, max_text: int, max_prompt: int, max_refs: int, plan_max_steps: int, plan_min_steps: int = 1
) -> dict[str, Any]:
    """Every action schema at its largest (as many references as allowed), for checking limits;
    ``plan_min`` is the shortest plan a visual plan may commit to."""
    refs = ["0" * 12] * max(1, max_refs)
    return {
        "interleaved": next_action_schema(
            refs, max_text=max_text, max_prompt=max_prompt, max_refs=max_refs, allow_image=True, allow_done=True
        ),
        "plan": plan_schema(min_steps=1, max_steps=plan_max_steps, max_title=plan_title_chars(max_prompt)),
        "plan_min": plan_schema(
            min_steps=plan_min_steps, max_steps=plan_min_steps, max_title=plan_title_chars(max_prompt)
        ),
        "step": step_schema(refs, max_text=max_text, max_prompt=max_prompt, max_refs=max_refs),
        "draft": draft_schema(
            refs, max_text=max_text, max_prompt=max_prompt, max_refs=max_refs, allow_draft=True, allow_answer=True
        ),
        "check": check_schema(),
        "revise": revise_schema(refs, max_prompt=max_prompt, max_refs=max_refs),
    }


# ---- parsing -----------------------------------------------------------------------------------

NextAction = TextAction | ImageAction | DoneAction
DraftOrAnswer = DraftAction | AnswerAction


def parse_json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise GenerationError(
            f"planner output is not complete JSON ({e.msg}); raise planner.max_new_tokens in the preset"
        ) from e


def parse_action(raw: str, model: Any) -> Any:
    """Parse ``raw`` into ``model`` (a pydantic class or a union of them)."""
    from pydantic import TypeAdapter

    data = parse_json(raw)
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as e:
        raise GenerationError(f"planner output does not match the action schema: {e.errors()[0]['msg']}") from e
