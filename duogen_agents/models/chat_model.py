"""The planner as a LangChain chat model, so LangGraph's ``messages`` stream mode sees its tokens.

Messages are langchain-core messages whose image content blocks name images in the store
(``{"type": "image", "file_id": <sha256>}``); pixels are loaded here, inside the model call, and
never enter graph state. Each image is preceded by a short label (``[image 1a2b3c4d5e6f]``) so the
planner can reference it by id. Pass the decoding grammar as the ``schema`` keyword:

>>> chat = PlannerChatModel(planner=planner, store=store)      # doctest: +SKIP
>>> chat.invoke(messages, schema=check_schema()).content        # doctest: +SKIP
'{"verdict": "ok", "note": "matches"}'
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, PrivateAttr

from duogen_agents.document import SHORT_ID_LENGTH
from duogen_agents.errors import ConfigError, GenerationError
from duogen_agents.inputs import image_from_block, is_image_block
from duogen_agents.models.protocols import ChatTurn, Planner, PlannerOutput
from duogen_agents.storage.images import is_image_id

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def image_label(image_id: str) -> str:
    return f"[image {image_id[:SHORT_ID_LENGTH]}]"


def to_chat_turns(messages: list[BaseMessage], load_image: Any) -> list[ChatTurn]:
    """Convert langchain messages to the planner's turns, resolving image blocks through ``load_image``."""
    turns: list[ChatTurn] = []
    for m in messages:
        role = _ROLES.get(m.type, "user")
        parts: list[Any] = []
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        for block in blocks:
            if isinstance(block, str):
                parts.append({"type": "text", "text": block})
            elif block.get("type") == "text":
                if not isinstance(block.get("text"), str):
                    raise ConfigError(f"a text block without its text (a string): {str(block)[:80]}")
                parts.append({"type": "text", "text": block["text"]})
            elif block.get("type") == "image" and "file_id" in block:  # an empty one too: never read as a url
                parts.append({"type": "image", "image": load_image(block["file_id"])})
                parts.insert(-1, {"type": "text", "text": image_label(block["file_id"])})
            elif is_image_block(block):  # base64, data:/file:// URL, OpenAI image_url
                parts.append({"type": "image", "image": image_from_block(block)})
        if calls := getattr(m, "tool_calls", None):  # the model's earlier tool calls, as it wrote them
            parts.append({"type": "text", "text": calls_text([(c["name"], c["args"]) for c in calls])})
        if m.type == "tool":
            parts.insert(0, {"type": "text", "text": f"Result of tool call {getattr(m, 'tool_call_id', '')}: "})
        if turns and turns[-1]["role"] == role and role == "system":
            turns[-1]["content"].extend(parts)
        else:
            turns.append({"role": role, "content": parts})  # type: ignore[typeddict-item]
    return turns


def usage_of(out: PlannerOutput) -> dict[str, Any]:
    """LangChain usage metadata; prompt tokens served from the kept KV cache count as ``cache_read``."""
    usage: dict[str, Any] = {
        "input_tokens": out.prompt_tokens,
        "output_tokens": out.num_tokens,
        "total_tokens": out.prompt_tokens + out.num_tokens,
    }
    if out.prefill_tokens is not None:
        usage["input_token_details"] = {"cache_read": out.prompt_tokens - out.prefill_tokens}
    return usage


class PlannerChatModel(BaseChatModel):
    """A ``BaseChatModel`` over a local ``Planner`` and the image store."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    planner: Any
    store: Any
    # Decoded history images by id. Ids are content hashes, so an entry can never go stale; without
    # this every planner call of a turn would decode every earlier PNG again.
    _decoded: OrderedDict[str, Any] = PrivateAttr(default_factory=OrderedDict)
    _decoded_lock: Any = PrivateAttr(default_factory=threading.Lock)  # calls from many threads share it

    def _load_image(self, image_id: str) -> Any:
        if not is_image_id(image_id):  # a caller's own block: an OpenAI file id, a short id, ""
            raise ConfigError(
                f"an image block's file_id {str(image_id)[:80]!r} is not a duogen image id (the 64 hex digits of "
                "a stored image); send other pictures as base64 or a data: URL"
            )
        with self._decoded_lock:
            if image_id in self._decoded:
                self._decoded.move_to_end(image_id)
                return self._decoded[image_id]
        image = self.store.open(image_id)
        with self._decoded_lock:
            self._decoded[image_id] = image
            if len(self._decoded) > 64:
                self._decoded.popitem(last=False)
        return image

    # LangChain's defaults count tokens with GPT-2's tokenizer, fetched from the Hugging Face hub: a
    # download at run time, and the wrong count. These count as the planner reads.

    def get_token_ids(self, text: str) -> list[int]:
        """``text``'s ids as the planner reads a message's text (its own tokenizer; a special token's
        text is plain text there), or ``custom_get_token_ids``. A served planner's tokenizer is on its
        server: ``NotImplementedError`` (``get_num_tokens`` then estimates)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        tokenizer = getattr(self.planner, "tokenizer", None)
        if tokenizer is None:
            raise NotImplementedError("a served planner's tokenizer is on its server; count with get_num_tokens")
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def get_num_tokens(self, text: str) -> int:
        if self.custom_get_token_ids is None and getattr(self.planner, "tokenizer", None) is None:
            return -(-len(text) // 4)  # LangChain's estimate: four characters a token
        return len(self.get_token_ids(text))

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None, **kwargs: Any
    ) -> int:
        """The tokens the planner reads for ``messages``: its chat template, each image's tokens, the
        opening of its answer and, with ``tools`` (and ``tool_choice``, ``parallel_tool_calls`` and
        ``response_format``, as ``bind_tools`` takes them), the tools' prompt as the call writes it. This is what ``trim_messages(token_counter=model)``
        needs. A served planner: LangChain's estimate by characters."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        formatted = [convert_to_openai_tool(t) for t in tools or []]
        if not hasattr(self.planner, "encode"):
            from langchain_core.messages.utils import count_tokens_approximately

            return count_tokens_approximately(messages, tools=formatted or None)
        turns, _, _ = with_tools(
            to_chat_turns(list(messages), self._load_image),
            formatted,
            kwargs.get("tool_choice"),
            parallel=kwargs.get("parallel_tool_calls"),
            answer=response_schema(kwargs.get("response_format")),
        )
        return int(self.planner.encode(turns)["input_ids"].shape[1])

    @property
    def _llm_type(self) -> str:
        return "duogen-planner"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        schema = kwargs.pop("schema", None)
        if schema is None:
            raise ValueError("PlannerChatModel needs a JSON schema: invoke(messages, schema=...)")
        planner: Planner = self.planner

        def on_token(token: str) -> None:
            if run_manager is not None:
                run_manager.on_llm_new_token(token, chunk=ChatGenerationChunk(message=AIMessageChunk(content=token)))

        out = planner.generate(
            to_chat_turns(messages, self._load_image),
            schema,
            max_new_tokens=kwargs.get("max_new_tokens"),
            seed=kwargs.get("seed"),
            on_token=on_token,
            cache_key=kwargs.get("cache_key"),
        )
        usage = usage_of(out)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=out.text, usage_metadata=usage))])


# ---- ChatDuogen: a preset's planner as a chat model other code can use --------------------------------


_VALUES = ("const", "enum", "default", "examples")  # keywords whose values are data, not schemas


def _local_ref(ref: Any) -> bool:
    """A JSON pointer into the schema itself: ``#`` or ``#/...`` (not an ``$anchor``'s ``#name``)."""
    return isinstance(ref, str) and (ref == "#" or ref.startswith("#/"))


def _rebased(node: Any, base: str) -> Any:
    """``node`` with each local ``$ref`` (``#`` or ``#/...``) moved under ``base`` (``#/$defs/tool0``);
    data (``const``, ``enum``, ``default``, ``examples``) is copied as it is. Iterative: a client's
    schema may nest deeper than Python's recursion limit."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(node, root, 0)]
    while stack:
        value, parent, key = stack.pop()
        if isinstance(value, list):
            copy: Any = [None] * len(value)
            stack.extend((item, copy, i) for i, item in enumerate(value))
        elif isinstance(value, dict):
            copy = dict.fromkeys(value)  # the keys in their order (a grammar writes properties in it)
            for k, v in value.items():
                if k in _VALUES or (k == "$ref" and not isinstance(v, (dict, list))):
                    copy[k] = base + v[1:] if k == "$ref" and _local_ref(v) else v
                else:
                    stack.append((v, copy, k))
        else:
            copy = value
        parent[key] = copy
    return root[0]


def _has_ref(node: Any) -> bool:
    """Whether a local ``$ref`` is anywhere in ``node`` (outside data); iterative, as ``_rebased``."""
    stack = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            if _local_ref(value.get("$ref")):
                return True
            stack.extend(v for k, v in value.items() if k not in _VALUES)
    return False


# The most calls in one answer (a weak model under the grammar could go on calling to its token budget).
MAX_CALLS = 8


def calls_text(calls: list[tuple[str, Any]]) -> str:
    """Tool calls (name, arguments) as the model writes them under the grammar of a turn with tools:
    how an earlier answer's calls read in the history."""
    written = [{"tool": name, "arguments": arguments} for name, arguments in calls]
    return json.dumps({"calls": written}, ensure_ascii=False)


def response_schema(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` as the JSON schema of the answer: ``json_schema``'s schema,
    ``json_object``'s any object, a pydantic class's schema, ``text``'s (or none) None. A ValueError
    for anything else."""
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return response_format.model_json_schema()  # a pydantic class, as ChatOpenAI takes one
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return schema
    raise ValueError(f"response_format type {str(kind)[:40]!r} is not supported (json_schema, json_object, text)")


def _tool_call_schema(
    tools: list[dict[str, Any]], required: bool, parallel: bool, answer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The grammar of one turn with tools: ``{"calls": [...]}``, calls of the tools with arguments
    under their parameters schemas (up to ``MAX_CALLS``; one unless ``parallel``), or (unless a call is
    required) an answer: text, ``{"text": ...}``, or JSON under the ``answer`` schema (a
    ``response_format``), ``{"answer": ...}``. Parameters with references (``$ref`` to their own
    ``$defs``, or ``#`` for a recursive one) go under the root's ``$defs``, their references rebased,
    so they resolve in the tool's schema and not in this wrapper."""
    defs: dict[str, Any] = {}
    calls = []
    for i, t in enumerate(tools):
        arguments = t["function"].get("parameters") or {"type": "object"}
        if _has_ref(arguments):
            defs[f"tool{i}"] = _rebased(arguments, f"#/$defs/tool{i}")
            arguments = {"$ref": f"#/$defs/tool{i}"}
        calls.append(
            {
                "type": "object",
                "properties": {"tool": {"const": t["function"]["name"]}, "arguments": arguments},
                "required": ["tool", "arguments"],
                "additionalProperties": False,
            }
        )
    items = {
        "type": "array",
        "items": {"anyOf": calls} if len(calls) > 1 else calls[0],
        "minItems": 1,
        "maxItems": MAX_CALLS if parallel else 1,
    }
    answers = [
        {
            "type": "object",
            "properties": {"calls": items},
            "required": ["calls"],
            "additionalProperties": False,
        }
    ]
    if not required:
        key, value = ("text", {"type": "string"}) if answer is None else ("answer", answer)
        if answer is not None and _has_ref(answer):  # as a tool's parameters with references (see above)
            defs["answer"] = _rebased(answer, "#/$defs/answer")
            value = {"$ref": "#/$defs/answer"}
        answers.append({"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False})
    schema = {"anyOf": answers} if len(answers) > 1 else answers[0]
    return {"$defs": defs, **schema} if defs else schema


def tools_prompt(
    tools: list[dict[str, Any]], required: bool, parallel: bool, answer: dict[str, Any] | None = None
) -> str:
    """What a turn with tools tells the model, in its system prompt: each tool's name, description and
    parameters (OpenAI function schemas), and the layout the grammar holds the answer to. The grammar
    alone makes any answer well-formed; only this tells the model what the tools are for."""
    lines = ["# Tools", "", "You can call these tools (their parameters are JSON schemas):"]
    for t in tools:
        f = t["function"]
        entry = {"name": f["name"], "description": f.get("description") or "", "parameters": f.get("parameters") or {}}
        lines.append(json.dumps(entry, ensure_ascii=False))
    lines.append("")
    if parallel:
        lines.append(
            'To call tools, answer with {"calls": [{"tool": <its name>, "arguments": <its arguments>}, ...]}: '
            f"one call, or up to {MAX_CALLS} that do not depend on each other's results."
        )
    else:
        lines.append('To call a tool, answer with {"calls": [{"tool": <its name>, "arguments": <its arguments>}]}.')
    if required:
        lines.append("Answer with a call.")
    elif answer is None:
        lines.append('To answer without a tool, answer with {"text": <your answer>}.')
    else:
        shown = json.dumps(answer, ensure_ascii=False)
        lines.append(f'To answer without a tool, answer with {{"answer": <your answer>}}, your answer under: {shown}')
    lines.append("The results of your calls come back in the next messages.")
    return "\n".join(lines)


def with_system_text(turns: list[ChatTurn], text: str) -> list[ChatTurn]:
    """``turns`` with ``text`` at the end of the system prompt (a system turn first if there is none):
    the same for every call of an agent loop, so the kept KV cache still covers it."""
    part = {"type": "text", "text": text}
    if turns and turns[0]["role"] == "system":
        first = {**turns[0], "content": [*turns[0]["content"], {"type": "text", "text": "\n\n"}, part]}
        return [first, *turns[1:]]  # type: ignore[list-item]
    return [{"role": "system", "content": [part]}, *turns]  # type: ignore[list-item]


def object_parameters(params: Any) -> dict[str, Any] | None:
    """A tool's parameters as the schema of an object: none is an object without properties, and a
    schema without a ``type`` (``{"properties": ...}``, as written by hand) gets ``"type": "object"``;
    None for anything else (a call's arguments are an object: LangChain's ``tool_calls`` hold a dict)."""
    if not params:
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        return None
    if "type" not in params and any(k in params for k in _NOT_AN_OBJECT_ALONE):
        return None  # {"enum": [5]}, {"anyOf": [integer, string]}: the grammar would follow those
    if params.get("type", "object") not in ("object", ["object"]):
        return None
    return {**params, "type": "object"}


# Keywords that, without a "type", let a schema be something other than an object.
_NOT_AN_OBJECT_ALONE = ("anyOf", "oneOf", "allOf", "not", "enum", "const", "$ref", "items", "prefixItems")


def with_tools(
    turns: list[ChatTurn],
    tools: list[dict[str, Any]],
    tool_choice: Any,
    *,
    parallel: bool | None = None,
    answer: dict[str, Any] | None = None,
) -> tuple[list[ChatTurn], dict[str, Any] | None, list[dict[str, Any]]]:
    """A call with ``tools`` (OpenAI function schemas) under ``tool_choice``: the turns with the tools'
    prompt, the grammar of the answer (calls, or a text answer), and the tools it may call; ``(turns,
    None, [])`` when it may call none (``"none"``, or no tools). ``parallel`` (OpenAI's
    ``parallel_tool_calls``; None is True, as there): several calls in one answer. A tool forced by
    name is called once, as OpenAI does. ``answer``: the schema of an answer that is not a call (a
    ``response_format``), else it is text."""
    kind, name = _tool_choice(tool_choice, [t["function"]["name"] for t in tools])
    if kind == "none" or not tools:
        return turns, None, []
    allowed = [t for t in tools if t["function"]["name"] == name] or tools
    required = kind != "auto"
    if isinstance(tool_choice, dict) and tool_choice.get("disable_parallel_tool_use"):  # Anthropic's
        parallel = False
    several = parallel is not False and kind != "tool"
    prompt = tools_prompt(allowed, required, several, answer)
    return with_system_text(turns, prompt), _tool_call_schema(allowed, required, several, answer), allowed


def _tool_choice(choice: Any, names: list[str]) -> tuple[str, str | None]:
    """``tool_choice`` as LangChain's chat models take it (ChatOpenAI's forms, Anthropic's dicts, and
    ``True`` as ChatGroq's: the one tool), as what the grammar does with it: ``("auto", None)`` (a
    call of any tool or a text answer), ``("none", None)`` (a text answer), ``("any", None)`` (a call
    of any tool) or ``("tool", name)``. A plain string names a bound tool first, as ChatOpenAI reads
    it, so a tool called ``none`` or ``auto`` can be forced. What it cannot mean is refused, so a
    choice is never silently dropped."""
    if isinstance(choice, dict):
        kind = choice.get("type")
        name = None
        if kind == "function":  # OpenAI: {"type": "function", "function": {"name": ...}}
            function = choice.get("function")
            name = function.get("name") if isinstance(function, dict) else None
        elif kind == "tool":  # Anthropic: {"type": "tool", "name": ...}
            name = choice.get("name")
        elif kind in ("auto", "any", "none"):  # Anthropic: {"type": "any"}, ...
            return str(kind), None
        if not isinstance(name, str) or name not in names:
            raise ValueError(
                f"tool_choice {choice!r}: name a bound tool ({', '.join(names) or 'none bound'}) as "
                "{'type': 'function', 'function': {'name': ...}}"
            )
        return "tool", name
    if choice is None or choice is False:
        return "auto", None
    if choice is True:
        if len(names) != 1:
            raise ValueError(
                f"tool_choice=True calls the one bound tool, and {len(names)} are bound; "
                "name one, or use 'any' for a call of any of them"
            )
        return "tool", names[0]
    if not isinstance(choice, str):
        raise ValueError(f"tool_choice {choice!r}: use a tool's name, 'auto', 'none', 'any' or 'required'")
    if choice in names:
        return "tool", choice
    if choice in ("auto", "none", "any", "required"):
        return ("any" if choice == "required" else choice), None
    raise ValueError(
        f"tool_choice {choice!r} is not a bound tool ({', '.join(names) or 'none bound'}) "
        "nor 'auto', 'none', 'any' or 'required'"
    )


def up_to_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, and whether one was there."""
    found = [i for s in stop if s and (i := text.find(s)) >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _chunk(piece: str | dict[str, Any]) -> tuple[str, ChatGenerationChunk]:
    """A streamed piece (text, or a ``tool_call_chunk``) as the token and chunk callbacks take it."""
    if isinstance(piece, dict):
        return "", ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[piece]))
    return piece, ChatGenerationChunk(message=AIMessageChunk(content=piece))


class _UpToStop:
    """Streamed text up to the first stop sequence, handed on to ``emit``. A stop sequence can span
    pieces (``"E"`` then ``"ND"``), so a tail that may begin one is held back until the next pieces
    show it does not. ``feed`` is the planner's token callback: it returns True, which ends decoding,
    once a stop sequence has appeared (with ``halt``) or once ``gone()`` says the reader has left.
    ``flush`` hands on the tail once decoding ended without one."""

    def __init__(
        self, stop: list[str], emit: Callable[[str], object], halt: bool, gone: Callable[[], bool] = lambda: False
    ) -> None:
        self.stop = [s for s in stop if s]
        self.emit = emit
        self.halt = halt
        self.gone = gone
        self.held = ""  # text not handed on yet: it may begin a stop sequence
        self.stopped = False

    def feed(self, piece: str) -> bool:
        if self.stopped:
            return self.halt or self.gone()
        text = self.held + piece
        found = [i for s in self.stop if (i := text.find(s)) >= 0]
        if found:
            self.stopped = True
            end = min(found)
        else:
            # only a tail shorter than the longest stop sequence can begin one (a longer one would be whole)
            tails = range(max(0, len(text) - max(map(len, self.stop), default=0) + 1), len(text))
            end = next((i for i in tails if any(s.startswith(text[i:]) for s in self.stop)), len(text))
        if end:
            self.emit(text[:end])
        self.held = text[end:]
        return (self.stopped and self.halt) or self.gone()

    def flush(self) -> None:
        if not self.stopped and self.held:
            self.emit(self.held)
            self.held = ""


class _ToolTurn:
    """A turn with tools, read as it is decoded. The grammar's answer is ``{"calls": [{"tool": NAME,
    "arguments": {...}}, ...]}`` or ``{"text": "..."}``; ``feed`` (the planner's token callback)
    hands on, as they arrive:

    - a text answer's characters, decoded from its JSON string, to ``on_text``, through ``_UpToStop``:
      the text ends at the first stop sequence, and so does decoding;
    - each call's start once its name is whole (``{"name", "id", "args": "", "index": i}``), then its
      arguments' JSON as the model writes it, piece by piece (``{"args": piece, "index": i}``), to
      ``on_call``: LangChain's ``tool_call_chunks``, the ``i``-th call of the answer. Stop sequences
      never cut a call.

    Another layout (a server whose grammar writes ``arguments`` first) is read whole at the end
    (``read_whole``) from where it left this one: nothing of it streams, nothing is lost, nothing
    is sent twice. ``feed`` returns True to end decoding: at a stop sequence in a text answer, or
    once ``gone()`` says the reader has left."""

    def __init__(
        self,
        stop: list[str],
        on_text: Callable[[str], object] | None,
        on_call: Callable[[dict[str, Any]], object] | None,
        gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self.raw = ""  # everything decoded
        self.pos = 0  # how far ``raw`` has been read
        self.state = "open"  # a key of _PUNCTUATION or _KEYS, or name, text, args, end, whole
        self.kind: str | None = None  # "calls", "text" or "answer" (JSON), once its key is read
        self.text: list[str] = []  # the text answer handed on (up to a stop sequence)
        self.decoded = ""  # text answer decoded but not yet handed to ``upto``
        self.upto = _UpToStop(stop, self._emit_text, halt=True, gone=gone)
        self.on_text = on_text
        self.on_call = on_call
        self.gone = gone
        self.calls: list[dict[str, Any]] = []  # {"id", "name", "arguments" (its JSON as written so far)}
        self.answer = ""  # a JSON answer's JSON (a response_format's) as written so far
        self.streamed = 0  # how many of ``calls`` went out through ``on_call``
        self.depth = 0  # the current call's arguments' nesting
        self.controls = JsonControls()  # where the arguments' strings are, and their control characters

    @property
    def stopped(self) -> bool:
        """A text answer cut at a stop sequence (its JSON is cut there too)."""
        return self.upto.stopped

    @property
    def is_text(self) -> bool:
        return self.kind == "text"

    @property
    def whole(self) -> bool:
        """The answer's layout was read to its end (a cut one ends in the middle)."""
        return self.state == "end" or self.stopped

    def feed(self, piece: str) -> bool:
        self.raw += piece
        while self._step():
            pass
        if self.decoded or self.stopped:
            text, self.decoded = self.decoded, ""
            return self.upto.feed(text)
        return self.gone()

    def flush(self) -> None:
        self.upto.flush()

    def read_whole(self, text: str) -> None:
        """At the end of decoding, an answer this reader could not stream (``state == "whole"``),
        read from its whole ``text``: the calls after those already streamed, or its text. A
        ValueError when it is not complete JSON of either layout."""
        data = json.loads(text, strict=False)  # a raw control character in a string: see _read_args
        calls = data.get("calls") if isinstance(data, dict) else None
        if isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("tool"), str) and isinstance(c.get("arguments"), dict)
            for c in calls
        ):
            self.kind = "calls"
            del self.calls[self.streamed :]  # a call whose name was read, but not its arguments: read again
            for c in calls[self.streamed :]:
                arguments = json.dumps(c["arguments"], ensure_ascii=False)
                call_id = f"call_{uuid.uuid4().hex[:12]}"
                self.calls.append({"id": call_id, "name": c["tool"], "arguments": arguments, "done": True})
        elif isinstance(data, dict) and isinstance(data.get("text"), str) and not self.streamed:
            self.kind = "text"
            self.text = [valid_unicode(data["text"])]
        elif isinstance(data, dict) and "answer" in data and not self.streamed:
            self.kind = "answer"
            self.answer = json.dumps(data["answer"], ensure_ascii=False)
        else:
            raise ValueError("neither calls nor a text answer")
        self.state = "end"

    def finished_calls(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The calls written whole, and the one the token budget cut in its arguments (None if none).
        A call cut before its arguments began is none: nothing of it streamed."""
        cut = next((c for c in self.calls[: self.streamed] if not c.get("done")), None)
        return [c for c in self.calls if c.get("done")], cut

    def _emit_text(self, piece: str) -> None:
        self.text.append(piece)
        if self.on_text is not None:
            self.on_text(piece)

    # -- reading ``raw`` from ``pos``: each state reads one whole unit, or waits with ``pos`` unmoved --

    def _step(self) -> bool:
        """One unit read; False when the reader waits for more text or has nothing left to read."""
        start, state = self.pos, self.state
        if state == "text":
            return self._read_text()
        if state == "args":
            return self._read_args()
        if state in ("end", "whole"):
            return False
        if not self._skip():
            return False
        c = self.raw[self.pos]
        if state in _PUNCTUATION:
            after = _PUNCTUATION[state].get(c)
            if after is None:
                return self._whole()
            self.pos += 1
            self.state = after
            return True
        if c != '"':
            return self._whole()
        value = self._string()
        if value is None:
            return self._wait(start)
        if state == "name":
            self.calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "name": value, "arguments": ""})
            self.state = "comma"
            return True
        # a key ("calls" or "text" first; in a call, "tool" then "arguments") and its colon
        if not self._skip():
            return self._wait(start)
        if self.raw[self.pos] != ":" or value not in _KEYS[state]:
            return self._whole()
        self.pos += 1
        if value == "calls":
            self.kind, self.state = "calls", "list"
            return True
        if value == "tool":
            self.state = "name"
            return True
        if not self._skip():  # the value's first character: an object's "{", or the text's opening quote
            return self._wait(start)
        if self.raw[self.pos] not in {"arguments": "{", "text": '"', "answer": "{["}[value]:
            return self._whole()
        if value == "text":
            self.pos += 1
            self.kind = self.state = "text"
            return True
        self.state, self.depth = "args", 0  # streamed from its first character, an object's "{"
        if value == "answer":
            self.kind = "answer"
            return True
        call = self.calls[-1]
        self.streamed += 1
        if self.on_call is not None:
            index = len(self.calls) - 1
            self.on_call(
                {"name": call["name"], "args": "", "id": call["id"], "index": index, "type": "tool_call_chunk"}
            )
        return True

    def _skip(self) -> bool:
        """Past whitespace; False at the end of what has been decoded so far."""
        while self.pos < len(self.raw) and self.raw[self.pos] in " \t\n\r":
            self.pos += 1
        return self.pos < len(self.raw)

    def _wait(self, start: int) -> bool:
        self.pos = start
        return False

    def _whole(self) -> bool:
        """Not the layout this reader streams: the answer is read whole at the end."""
        self.state = "whole"
        return False

    def _string(self) -> str | None:
        """A whole JSON string at ``pos`` (its opening quote), or None until its closing quote is decoded."""
        end = self.pos + 1
        while end < len(self.raw):
            if self.raw[end] == "\\":
                end += 2
            elif self.raw[end] == '"':
                try:
                    value = json.loads(self.raw[self.pos : end + 1])
                except ValueError:
                    return None
                self.pos = end + 1
                return value if isinstance(value, str) else None
            else:
                end += 1
        return None

    def _read_args(self) -> bool:
        """The current call's arguments' JSON (or a JSON answer) as decoded so far, handed on; it
        ends where its object closes. A raw control character inside a string (xgrammar lets one
        through a string with ``maxLength``) is handed on escaped, so it is always JSON."""
        piece = []
        while self.pos < len(self.raw) and self.state == "args":
            c = self.raw[self.pos]
            self.pos += 1
            outside = not self.controls.in_string
            piece.append(self.controls.char(c))
            if outside and c in "{[":
                self.depth += 1
            elif outside and c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.state = "close" if self.kind == "answer" else "call_end"
                    if self.kind != "answer":
                        self.calls[-1]["done"] = True
        text = "".join(piece)
        if self.kind == "answer":  # a JSON answer streams as its text does
            self.answer += text
            if text and self.on_text is not None:
                self.on_text(text)
            return self.state != "args"
        self.calls[-1]["arguments"] += text
        if text and self.on_call is not None:
            index = len(self.calls) - 1
            self.on_call({"name": None, "args": text, "id": None, "index": index, "type": "tool_call_chunk"})
        return self.state != "args"

    def _read_text(self) -> bool:
        """A text answer's string, decoded as far as whole characters go (an escape waits for its
        end). A lone surrogate (the grammar lets ``\\ud83d`` through alone) reads as U+FFFD, so the
        text is valid Unicode wherever it goes; an escape JSON does not have is kept as written."""
        out = []
        while self.pos < len(self.raw):
            c = self.raw[self.pos]
            if c == '"':
                self.pos += 1
                self.state = "end"
                break
            if c != "\\":
                out.append(c)
                self.pos += 1
                continue
            if self.raw[self.pos + 1 : self.pos + 2] != "u":
                escape = self.raw[self.pos : self.pos + 2]
                if len(escape) < 2:
                    break
                out.append(_SIMPLE_ESCAPES.get(escape[1], escape))
                self.pos += 2
                continue
            digits = self.raw[self.pos + 2 : self.pos + 6]
            code = _hex4(digits)
            if code is None:
                if len(digits) < 4 and all(d in "0123456789abcdefABCDEF" for d in digits):
                    break  # the escape's digits are still to come
                out.append(self.raw[self.pos : self.pos + 2])  # not an escape: kept as written
                self.pos += 2
                continue
            size = 6
            if 0xD800 <= code <= 0xDBFF:  # a high surrogate: a pair only with a low one right after
                after = self.raw[self.pos + 6 : self.pos + 12]
                if len(after) < 6 and "\\u".startswith(after[:2]):
                    break  # what follows is not decoded yet
                low = _hex4(after[2:]) if after.startswith("\\u") else None
                if low is not None and 0xDC00 <= low <= 0xDFFF:
                    out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                    self.pos += 12
                    continue
                code = 0xFFFD
            elif 0xDC00 <= code <= 0xDFFF:
                code = 0xFFFD
            out.append(chr(code))
            self.pos += size
        self.decoded += "".join(out)
        return False


# The layout of a turn with tools, for ``_ToolTurn``: at a state, the character it reads and the state after it ...
_PUNCTUATION = {
    "open": {"{": "key"},
    "list": {"[": "call"},
    "call": {"{": "tool"},
    "comma": {",": "arguments"},
    "call_end": {"}": "next"},
    "next": {",": "call", "]": "close"},
    "close": {"}": "end"},
}
# ... or the keys it reads there.
_KEYS = {"key": ("calls", "text", "answer"), "tool": ("tool",), "arguments": ("arguments",)}

_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class JsonControls:
    """A JSON answer's text with each raw control character inside a string escaped (``\\n``,
    ``\\u001b``), fed piece by piece as it streams. xgrammar 0.2.8 lets control characters through a
    string with ``maxLength``; JSON forbids them there, so ``json.loads`` refused an answer the
    grammar had passed. Escaped, the string's value is the same and the text is JSON."""

    def __init__(self) -> None:
        self.in_string = False
        self.escaped = False

    def feed(self, piece: str) -> str:
        return "".join(map(self.char, piece))

    def char(self, c: str) -> str:
        """One character of the answer, as it goes on (escaped where it is a raw control character)."""
        if not self.in_string:
            self.in_string = c == '"'
        elif self.escaped:
            self.escaped = False
        elif c == "\\":
            self.escaped = True
        elif c == '"':
            self.in_string = False
        elif c < " ":
            return json.dumps(c)[1:-1]
        return c


def valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate (JSON lets ``"\\ud83d"`` stand alone) as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _hex4(digits: str) -> int | None:
    """Four hex digits' value, or None (too few, or not hex)."""
    if len(digits) < 4 or any(d not in "0123456789abcdefABCDEF" for d in digits[:4]):
        return None
    return int(digits[:4], 16)


_PLANNERS: dict[tuple[str, str], Any] = {}
_PLANNERS_LOCK = threading.Lock()


class ChatDuogen(PlannerChatModel):
    """A preset's planner as a LangChain chat model, the way ``ChatOllama`` or ``ChatHuggingFace``
    are: free text, streaming, usage metadata, images in (every standard image block), structured
    output and tool calls enforced by a grammar.

    >>> chat = ChatDuogen(preset="tiny")                                        # doctest: +SKIP
    >>> chat.invoke("Describe a picnic").content                                # doctest: +SKIP
    >>> chat.with_structured_output(Plan).invoke("Plan a picnic")               # doctest: +SKIP
    >>> chat.bind_tools([draw_image]).invoke("Draw a pot").tool_calls           # doctest: +SKIP
    """

    preset: str = "tiny"
    home: str | None = None
    max_tokens: int | None = None
    # The cap when ``max_tokens`` is not given (else the preset's planner.max_new_tokens).
    default_max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    planner: Any = None
    store: Any = None

    def model_post_init(self, context: Any) -> None:
        if self.planner is None:
            from pathlib import Path

            from duogen_agents.presets import load_preset
            from duogen_agents.storage.images import ImageStore, default_home

            spec = load_preset(self.preset)
            root = Path(self.home) if self.home else default_home()
            models = spec.models_path(root)
            key = (spec.planner.model_dump_json(), str(models))
            with _PLANNERS_LOCK:  # one loaded planner per preset and models folder, shared
                if key not in _PLANNERS:
                    from duogen_agents.models.remote import build_planner

                    _PLANNERS[key] = build_planner(spec.planner, models)
                self.planner = _PLANNERS[key]
            if self.store is None:
                self.store = ImageStore(root)
        if self.profile is None:
            self.profile = self._profile()

    def _profile(self) -> dict[str, Any]:
        """What LangChain's model profile asks (``model.profile``: middleware such as
        ``SummarizationMiddleware`` reads ``max_input_tokens`` from it), as this model does it."""
        profile: dict[str, Any] = {
            "open_weights": True,
            "text_inputs": True,
            "image_inputs": True,
            "image_url_inputs": False,  # http(s) image URLs are refused here; data: URLs are read
            "image_tool_message": True,
            "pdf_inputs": False,
            "audio_inputs": False,
            "video_inputs": False,
            "text_outputs": True,
            "image_outputs": False,
            "tool_calling": True,
            "tool_choice": True,
            "tool_call_streaming": True,
            "structured_output": True,
        }
        if context := getattr(self.planner, "context_tokens", None):
            profile["max_input_tokens"] = int(context) - 1  # the planner's own limit (PromptTooLongError past it)
        return profile

    @property
    def model_name(self) -> str:
        return str(getattr(getattr(self.planner, "spec", None), "model", self.preset))

    @property
    def _llm_type(self) -> str:
        return "duogen"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every field that changes the answer: LangChain's LLM cache keys an answer by these (and
        the call's own arguments), so two models that differ in any of them never share one. The
        planner is known by a digest of its resolved spec and where its weights came from (the
        models folder, which ``home`` picks; a server's URL), or by its class when it has no spec.
        The stop sequences go in through ``_get_invocation_params``."""
        planner = self.planner
        dump = getattr(getattr(planner, "spec", None), "model_dump_json", None)
        described = dump() if dump is not None else type(planner).__qualname__
        source = getattr(planner, "source", None) or getattr(planner, "url", None) or ""
        return {
            "preset": self.preset,
            "model_name": self.model_name,
            "planner": hashlib.sha256(f"{described}\n{source}".encode()).hexdigest()[:16],
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "default_max_tokens": self.default_max_tokens,
        }

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """With the stop sequences the call uses (its own, else the model's), for the cache key and traces."""
        return super()._get_invocation_params(stop=stop or self.stop, **kwargs)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop or self.stop, **kwargs)
        params["ls_provider"] = "duogen"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        return params

    def _call(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        on_token: Any,
        gone: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        """One answer. ``on_token`` gets the text as it streams, up to the first stop sequence
        (``stop``, else the model's); a text answer's decoding ends there. Decoding also ends once
        ``gone()`` says the stream's reader has left (any answer: text, JSON or a tool call)."""
        schema = kwargs.get("schema")  # a caller's own grammar (structured output) wins over tools
        turns = to_chat_turns(messages, self._load_image)
        tools: list[dict[str, Any]] = []
        if schema is None:
            # OpenAI's response_format (LangChain's ProviderStrategy binds it beside an agent's tools):
            # the answer that is not a call is JSON under its schema
            answer = response_schema(kwargs.get("response_format"))
            turns, schema, tools = with_tools(
                turns,
                kwargs.get("tools") or [],
                kwargs.get("tool_choice"),
                parallel=kwargs.get("parallel_tool_calls"),
                answer=answer,
            )
            if not tools:
                schema = answer
        # per call: invoke(..., max_tokens=N) or bind(max_tokens=N), as LangChain's chat models take it
        limit = kwargs.get("max_tokens") or kwargs.get("max_new_tokens") or self.max_tokens or self.default_max_tokens
        stop = stop or self.stop
        if schema is not None:
            # Never cut a constrained answer mid-JSON: give it what its schema can take.
            from duogen_agents.graphs.actions import max_action_tokens

            try:
                need = max_action_tokens(schema)
            except (ValueError, KeyError, TypeError):  # unbounded strings: the planner's own cap
                need = getattr(getattr(self.planner, "spec", None), "max_new_tokens", None) or 0
            limit = max(limit or 0, need) or None
        # A turn with tools streams its text answer (up to a stop sequence, where decoding ends) or its
        # call (the name, then the arguments as written). A JSON answer decodes on to its end (a server
        # checks it whole) and is cut below like any answer; a text answer's decoding ends at its stop
        # sequence. Decoding also ends once the stream's reader has left.
        upto: _UpToStop | None = None
        turn: _ToolTurn | None = None
        callback = None if gone is None else (lambda piece: gone())
        if tools:
            turn = _ToolTurn(stop or [], on_token, on_token, gone=gone or (lambda: False))
            callback = turn.feed
        elif on_token is not None and not tools:
            upto = _UpToStop(stop or [], on_token, halt=schema is None, gone=gone or (lambda: False))
            callback = upto.feed
            if schema is not None:  # a JSON answer streams as JSON (see JsonControls)
                controls, feed = JsonControls(), upto.feed
                callback = lambda piece: feed(controls.feed(piece))  # noqa: E731
        out = self.planner.generate(
            turns,
            schema,
            max_new_tokens=limit,
            seed=kwargs.get("seed", self.seed),
            on_token=callback,
            cache_key=kwargs.get("cache_key"),
        )
        for reader in (upto, turn):
            if reader is not None:
                reader.flush()
        usage = usage_of(out)
        # as ChatOpenAI reports it: "length" for an answer cut by its token budget
        meta = {
            "model_name": self.model_name,
            "model_provider": "duogen",
            "finish_reason": "stop" if out.complete else "length",
        }
        if turn is not None:
            return self._answer_with_tools(turn, out.text, stop or [], usage, meta)
        text = out.text if schema is None else JsonControls().feed(out.text)
        return AIMessage(content=up_to_stop(text, stop or [])[0], usage_metadata=usage, response_metadata=meta)

    @staticmethod
    def _answer_with_tools(turn: _ToolTurn, raw: str, stop: list[str], usage: Any, meta: dict[str, Any]) -> AIMessage:
        """The message of a turn with tools: its calls, or its answer as it streamed (text cut at a
        stop sequence, or JSON under the call's ``response_format``). One cut by the token budget (``finish_reason`` "length") is what it holds:
        the text so far, or the whole calls and the cut one as an invalid call."""
        if turn.state == "whole":  # another layout: read whole now
            try:
                turn.read_whole(raw)
            except ValueError as e:
                if turn.finished_calls()[0]:  # cut after calls that streamed whole: those stay
                    return ChatDuogen._calls_message(turn, usage, meta)
                raise GenerationError(
                    f"the model's answer with tools is neither calls nor an answer ({e}); if it was cut, raise "
                    "max_tokens"
                ) from None
            if turn.is_text:  # a stop sequence cuts text, never a call
                turn.text = [up_to_stop(turn.text[0], stop)[0]]
        if turn.kind == "answer":  # JSON under the response_format: its text, as it streamed
            return AIMessage(content=turn.answer, usage_metadata=usage, response_metadata=meta)
        if not any(turn.finished_calls()):  # a text answer (or an answer cut before its first call)
            return AIMessage(content="".join(turn.text), usage_metadata=usage, response_metadata=meta)
        return ChatDuogen._calls_message(turn, usage, meta)

    @staticmethod
    def _calls_message(turn: _ToolTurn, usage: Any, meta: dict[str, Any]) -> AIMessage:
        """The calls written whole, and the one cut in its arguments as an invalid call."""
        whole, cut = turn.finished_calls()
        calls = [{"name": c["name"], "args": json.loads(c["arguments"], strict=False), "id": c["id"]} for c in whole]
        invalid = []
        if cut is not None:  # cut by the token budget, as ChatOpenAI reports one: invalid, beside the whole ones
            error = "cut by the token budget (finish_reason 'length'): raise max_tokens"
            invalid.append({"name": cut["name"], "args": cut["arguments"], "id": cut["id"], "error": error})
        meta = {**meta, "finish_reason": "tool_calls" if turn.state == "end" else "length"}
        return AIMessage(
            content="", tool_calls=calls, invalid_tool_calls=invalid, usage_metadata=usage, response_metadata=meta
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        def on_token(piece: str | dict[str, Any]) -> None:
            if run_manager is not None:
                token, chunk = _chunk(piece)
                run_manager.on_llm_new_token(token, chunk=chunk)

        return ChatResult(generations=[ChatGeneration(message=self._call(messages, stop, on_token, **kwargs))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Tokens as they are decoded (the model runs in a worker thread) up to the first stop
        sequence, then one last chunk with the usage metadata. With tools, a text answer streams the
        same way, and a call as ``tool_call_chunks``: its name and id once the name is whole, then its
        arguments' JSON piece by piece, as ChatOpenAI streams one."""
        import queue

        tokens: queue.Queue[Any] = queue.Queue()
        done = object()
        result: dict[str, Any] = {}
        gone = threading.Event()  # the reader closed the stream early: decoding ends at the next piece

        def work() -> None:
            try:
                result["message"] = self._call(messages, stop, tokens.put, gone.is_set, **kwargs)
            except BaseException as e:  # handed to the caller's thread
                result["error"] = e
            finally:
                tokens.put(done)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        text = ""
        streamed = 0  # tool calls that went out in pieces (each its name, then its arguments)
        try:
            while (piece := tokens.get()) is not done:
                token, chunk = _chunk(piece)
                text += token
                streamed += isinstance(piece, dict) and piece["name"] is not None
                if run_manager is not None:
                    run_manager.on_llm_new_token(token, chunk=chunk)
                yield chunk
        finally:
            gone.set()  # closed early (a reader that broke off): the planner stops, freeing the device
        worker.join()
        if "error" in result:
            raise result["error"]
        message: AIMessage = result["message"]
        last = AIMessageChunk(
            content="" if text or not isinstance(message.content, str) else message.content,
            usage_metadata=message.usage_metadata,
            response_metadata=message.response_metadata,
            tool_call_chunks=[  # calls read whole at the end (another layout), not streamed
                {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"}
                for i, c in enumerate(message.tool_calls)
                if i >= streamed
            ],
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last)

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Tools as OpenAI function schemas; each call's arguments are decoded under its parameters
        schema. ``tool_choice``: None, False or ``"auto"`` (calls or a text answer), ``"none"`` (a
        text answer), ``"any"``/``"required"`` (calls of any tools), a tool's name or
        ``{"type": "function", "function": {"name": ...}}`` (a call of that tool; Anthropic's dicts
        too), ``True`` (a call of the one tool). Anything else is a ValueError here.
        ``parallel_tool_calls`` (as ChatOpenAI's; None is True): an answer may hold several calls,
        which LangGraph's ``ToolNode`` runs at once; False (or Anthropic's
        ``disable_parallel_tool_use`` in ``tool_choice``) holds it to one."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        formatted = []
        for tool in tools:  # copies: an OpenAI dict comes back from the conversion as the caller's own
            t = convert_to_openai_tool(tool)
            params = object_parameters(t["function"].get("parameters"))
            if params is None:  # a call's arguments are an object (LangChain's tool_calls hold a dict)
                raise ValueError(f"tool {t['function']['name']!r}: its parameters must be a JSON schema of an object")
            formatted.append({**t, "function": {**t["function"], "parameters": params}})
        _tool_choice(tool_choice, [t["function"]["name"] for t in formatted])  # refused here, not at the call
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self, schema: Any, *, method: str = "json_schema", include_raw: bool = False, **kwargs: Any
    ) -> Any:
        """Output under ``schema`` (a pydantic class, a TypedDict or a JSON schema), enforced by the
        grammar; parsed into the class for pydantic, a dict otherwise. With ``include_raw``, a
        parse that fails (a validator the grammar cannot express) is ``parsing_error``, not raised,
        as LangChain's chat models do."""
        from operator import itemgetter

        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
        from langchain_core.runnables import RunnableMap, RunnablePassthrough
        from langchain_core.utils.function_calling import convert_to_json_schema
        from pydantic import BaseModel as _BaseModel
        from pydantic.v1 import BaseModel as _BaseModelV1

        is_v1 = isinstance(schema, type) and issubclass(schema, _BaseModelV1)
        is_pydantic = is_v1 or (isinstance(schema, type) and issubclass(schema, _BaseModel))
        if is_v1:
            json_schema = schema.schema()
        elif is_pydantic:
            json_schema = schema.model_json_schema()
        elif (
            isinstance(schema, dict)
            and "title" not in schema
            and ("type" in schema or "anyOf" in schema)
            and schema.get("type") != "function"  # an OpenAI tool ({"type": "function", ...}): converted below
        ):
            json_schema = dict(schema)  # a plain JSON schema: LangChain's conversion wants a title
        else:
            json_schema = convert_to_json_schema(schema)
        json_schema = {k: v for k, v in json_schema.items() if k not in ("title", "description")}
        llm = self.bind(
            schema=json_schema, ls_structured_output_format={"schema": schema, "kwargs": {"method": method}}
        )
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parse_or_none = parse.with_fallbacks(
            [RunnablePassthrough.assign(parsed=lambda _: None)], exception_key="parsing_error"
        )
        return RunnableMap(raw=llm) | parse_or_none
