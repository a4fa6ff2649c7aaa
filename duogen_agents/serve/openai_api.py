"""The OpenAI-compatible model surface of ``duogen serve``, backed by this process's models.

- ``POST /v1/chat/completions``: the planner continues the messages (text, and images as ``image_url``
  parts with ``data:`` URLs). ``response_format`` ``{"type": "json_schema", "json_schema": {"schema":
  ...}}`` decodes under the schema's grammar (xgrammar: every answer parses and matches), ``json_object``
  under any JSON object, ``text`` or none as free text; beside ``tools``, it is the schema of an answer
  that is not a call. ``max_tokens`` / ``max_completion_tokens``,
  ``seed``, ``stream`` (with ``stream_options.include_usage``). The sampling settings are the
  preset's (``planner.temperature``, ``top_p``); a request's own are not applied.
  ``prompt_cache_key`` (or ``user``, or the ``x-duogen-session`` header) names the conversation whose
  KV cache the planner keeps between requests (the remote planner sends its session there). A
  client's schema decodes token by token (no jump forward: xgrammar's search for forced text has no
  bound), and a ``pattern`` that expands past ``MAX_PATTERN_SIZE`` pieces is refused (the grammar
  compiler writes bounded repeats out: ``a{100000000}`` alone exhausts memory). Messages longer than the
  planner's context are refused with ``context_length_exceeded``. ``tools`` (function tools) and
  ``tool_choice`` (``auto``, ``none``, ``required``, a function by name) as OpenAI's: the model is told
  the tools in its system prompt, the answer decodes under a grammar of calls or a text answer, and
  calls come as ``tool_calls`` (streamed: each call's id and name first, then its arguments in
  pieces) with ``finish_reason`` ``tool_calls``. ``parallel_tool_calls`` (default true, as OpenAI's):
  an answer may hold several calls; false holds it to one (as does a function forced by name).
  History messages carry an assistant's ``tool_calls`` and ``tool`` results. ``stop`` cuts a text answer and ends its decoding (never a call). A streamed answer whose
  client hangs up ends its decoding at the next piece.
- ``POST /v1/images/generations``: text to image. ``POST /v1/images/edits``: multipart, one or more
  ``image`` (or ``image[]``) files as references; ``kind`` (a form field, this server's extension)
  is ``edit`` (default), ``generate`` (a new picture keeping the referenced subjects) or
  ``continue``; what the image family cannot do is refused with 400. ``b64_json`` only; ``size`` other
  than the preset's canvas is a resize of the drawn picture.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import threading
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from duogen_agents.errors import ConfigError, GenerationError, InputImageError
from duogen_agents.serve.app import ApiError, ServerState, api_error, error_body
from duogen_agents.serve.gate import Slot, in_thread
from duogen_agents.validation import check_text, validation_line

router = APIRouter()
MAX_TOKENS = 32768
MAX_IMAGES_PER_REQUEST = 16
# Decoded pixels of all the images of one request: a small PNG can hold a huge flat canvas, so the
# body limit alone bounds nothing here (16 images of 40 MP would be ~2 GB of RGB).
MAX_REQUEST_PIXELS = 4096 * 4096
# A client schema's regular expressions, expanded as the grammar compiler expands bounded repeats
# (a{n,m} is m copies; repeats in sequence add up, nested ones multiply): a{10000} took 4.3 s to
# compile on a 2-core CPU and a{20000} 20 s, while ^[a-z]{1,64}@[a-z]{1,255}$ is about 320.
MAX_PATTERN_SIZE = 4096


class PixelBudget:
    """Counts the pixels of a request's images from their headers, before any is decoded."""

    def __init__(self, limit: int = MAX_REQUEST_PIXELS) -> None:
        self.limit = limit
        self.left = limit

    def take(self, data: bytes, where: str) -> None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                pixels = im.width * im.height
        except Exception:  # not an image: decoding it reports that in one line
            return
        self.left -= pixels
        if self.left < 0:
            raise ApiError(
                413, f"{where}: the images of one request may hold {self.limit:,} pixels in all", code="too_many_pixels"
            )

    def take_data_url(self, url: str, where: str) -> None:
        head, _, payload = url.partition(",")
        if head.endswith(";base64"):
            try:
                self.take(base64.b64decode(payload, validate=False), where)
            except ValueError:
                return  # decoding reports a bad payload


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server does not use


class StreamOptions(_Loose):
    include_usage: bool = False


class ChatRequest(_Loose):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=128)
    prompt_cache_key: str | None = Field(None, max_length=128)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None: True, as OpenAI's
    stop: str | list[str] | None = None


class ImageRequest(_Loose):
    prompt: str = Field(min_length=1, max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=4)
    size: str | None = None
    response_format: Literal["b64_json"] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


def _state(request: Request) -> ServerState:
    return request.app.state.duogen


def _check_model(state: ServerState, model: str | None, role: str) -> None:
    want = state.planner_id if role == "planner" else state.image_id
    if model is not None and model != want:
        raise ApiError(
            404, f"the model {model!r} does not exist here; this server's {role} is {want!r} (GET /v1/models)",
            "not_found_error", "model_not_found",
        )  # fmt: skip


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": state.planner_id, "object": "model", "created": created, "owned_by": "duogen",
             "duogen_role": "planner", "root": state.agent.preset.planner.model},
            {"id": state.image_id, "object": "model", "created": created, "owned_by": "duogen",
             "duogen_role": "image"},
        ],
    }  # fmt: skip


# ---- chat completions -------------------------------------------------------------------------------


def _client_image(part: dict[str, Any], allow_remote: bool, budget: PixelBudget, where: str) -> Any:
    """An image part from a client: data URLs (or http(s) with ``allow_remote_images``), never a
    ``file://`` URL or a path on this server."""
    from duogen_agents.inputs import image_from_block

    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise ApiError(400, "an image_url part needs image_url.url (a data: URL)")
    if not (url.startswith("data:") or (allow_remote and url.startswith(("http://", "https://")))):
        raise ApiError(400, "images must be data: URLs (base64) here" + ("" if allow_remote else "; http(s) is off"))
    if url.startswith("data:"):
        budget.take_data_url(url, where)
    try:
        return image_from_block({"type": "image_url", "image_url": {"url": url}}, allow_remote=allow_remote)
    except InputImageError as e:
        raise ApiError(400, str(e)) from None


def to_turns(messages: list[dict[str, Any]], allow_remote: bool = False) -> list[dict[str, Any]]:
    """OpenAI chat messages as the planner's ``ChatTurn`` list. An assistant's tool calls and a tool's
    result read as ``ChatDuogen`` writes them: the call as the JSON the grammar decodes, the result as
    a user turn that names its call."""
    from duogen_agents.models.chat_model import calls_text

    roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "user"}
    turns: list[dict[str, Any]] = []
    images = 0
    budget = PixelBudget()
    for i, m in enumerate(messages):
        role = roles.get(str(m.get("role")))
        if role is None:
            raise ApiError(
                400, f"messages[{i}]: role {m.get('role')!r} is not supported (system, user, assistant, tool)"
            )
        content = m.get("content")
        parts: list[dict[str, Any]] = []
        calls = _tool_calls(m.get("tool_calls"), i) if role == "assistant" else []
        if m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not 0 < len(call_id) <= 128:
                raise ApiError(400, f"messages[{i}]: a tool message needs its tool_call_id (1 to 128 characters)")
            parts.append({"type": "text", "text": f"Result of tool call {_text(call_id, i)}: "})
        if isinstance(content, str):
            parts.append({"type": "text", "text": _text(content, i)})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": _text(part["text"], i)})
                elif kind == "image_url":
                    images += 1
                    if images > MAX_IMAGES_PER_REQUEST:
                        raise ApiError(400, f"at most {MAX_IMAGES_PER_REQUEST} images per request")
                    parts.append(
                        {"type": "image", "image": _client_image(part, allow_remote, budget, f"messages[{i}]")}
                    )
                else:
                    raise ApiError(400, f"messages[{i}]: content part of type {kind!r} is not supported")
        elif content is None and role == "assistant":
            if not calls:
                continue
        else:
            raise ApiError(400, f"messages[{i}]: content must be a string or a list of parts")
        if calls:
            parts.append({"type": "text", "text": _text(calls_text(calls), i)})
        turns.append({"role": role, "content": parts})
    if not turns:
        raise ApiError(400, "messages: none has content (an assistant message without content is skipped)")
    return turns


def _tool_calls(calls: Any, i: int) -> list[tuple[str, Any]]:
    """An assistant message's ``tool_calls``: each one's name and arguments."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise ApiError(400, f"messages[{i}].tool_calls must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not isinstance(fn.get("arguments"), str):  # type: ignore[union-attr]
            raise ApiError(
                400, f"messages[{i}].tool_calls[{j}]: needs function.name and function.arguments (a JSON string)"
            )
        try:
            arguments = json.loads(fn["arguments"])  # type: ignore[index]
        except (ValueError, RecursionError):
            raise ApiError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
        out.append((name, arguments))
    return out


def _text(text: str, i: int) -> str:
    try:
        return check_text(text, f"messages[{i}]")
    except ConfigError as e:
        raise ApiError(400, str(e)) from None


def _pattern_size(pattern: str, where: str = "response_format") -> int:
    """How many pieces the grammar compiler makes of ``pattern`` (bounded repeats written out)."""
    import re._parser as sre  # the standard library's parser of regular expressions

    def size(items: Any) -> int:
        total = 0
        for op, arg in items:
            if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                low, high, sub = arg
                total += max(1, high if high != sre.MAXREPEAT else low + 1) * size(sub)
            elif op is sre.SUBPATTERN:
                total += size(arg[-1])
            elif op is sre.BRANCH:
                total += sum(size(branch) for branch in arg[1])
            elif op in (sre.ASSERT, sre.ASSERT_NOT, sre.ATOMIC_GROUP):
                total += size(arg[-1])
            else:
                total += 1
        return total

    try:
        return size(sre.parse(pattern))
    except (re.error, OverflowError, RecursionError) as e:
        raise ApiError(400, f"{where}: the pattern {pattern[:60]!r} is not a regular expression ({e})") from None


def check_client_schema(schema: Any, where: str = "response_format") -> None:
    """Refuse what would exhaust the grammar compiler: patterns (``pattern``, ``patternProperties``'
    keys) that expand past ``MAX_PATTERN_SIZE`` pieces."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        if not isinstance(node, dict):
            continue
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += [k for k in node["patternProperties"] if isinstance(k, str)]
        for pattern in patterns:
            if (n := _pattern_size(pattern, where)) > MAX_PATTERN_SIZE:
                raise ApiError(
                    400,
                    f"{where}: the pattern {pattern[:60]!r} expands to {n:,} pieces (bounded repeats "
                    f"written out), over {MAX_PATTERN_SIZE:,}; use + or * with maxLength",
                )
        stack.extend(node.values())


def schema_of(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    from duogen_agents.models.chat_model import response_schema

    try:
        return response_schema(response_format)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _compile_schema(planner: Any, schema: dict[str, Any] | None, where: str = "response_format") -> None:
    """Refuse a schema the grammar compiler rejects before admitting the request (400, not 500)."""
    if schema is None or not hasattr(planner, "compile"):
        return
    check_client_schema(schema, where)
    try:
        planner.compile(schema)
    except GenerationError as e:
        raise ApiError(400, f"{where}: {e}") from None
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise ApiError(400, f"{where}: invalid JSON schema ({type(e).__name__}: {e})") from None


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128
MAX_STOPS = 16


def tools_of(body: ChatRequest) -> list[dict[str, Any]]:
    """The request's function tools, checked with its ``tool_choice``; none when the answer is text
    (no tools, or ``tool_choice`` none). ``with_tools`` makes the call's prompt and grammar of them."""
    from duogen_agents.models.chat_model import _tool_choice, object_parameters

    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise ApiError(400, f"tool_choice {body.tool_choice!r} needs tools")
        return []
    if len(body.tools) > MAX_TOOLS:
        raise ApiError(400, f"tools: at most {MAX_TOOLS}")
    tools = []
    for i, tool in enumerate(body.tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise ApiError(
                400, f"tools[{i}]: only function tools are supported: {{'type': 'function', 'function': {{...}}}}"
            )
        name, params = fn.get("name"), object_parameters(fn.get("parameters"))
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ApiError(400, f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -")
        if params is None:  # arguments are an object
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema of an object")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ApiError(400, f"tools[{i}].function.description must be a string")
        try:
            description = check_text(description, f"tools[{i}].function.description")
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        tools.append({"type": "function", "function": {"name": name, "description": description, "parameters": params}})
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise ApiError(400, "tools: two tools have the same name")
    try:
        kind, _ = _tool_choice(body.tool_choice, names)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return [] if kind == "none" else tools


def stops_of(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or not all(0 < len(s) <= 256 for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} sequences of 1 to 256 characters")
    return stops


def _usage(out: Any) -> dict[str, Any]:
    usage = {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.num_tokens,
        "total_tokens": out.prompt_tokens + out.num_tokens,
    }
    if out.prefill_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": out.prompt_tokens - out.prefill_tokens}
    return usage


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Any:
    from duogen_agents.models.chat_model import JsonControls, _ToolTurn, _UpToStop, with_tools

    state = _state(request)
    _check_model(state, body.model, "planner")
    planner = state.agent.planner
    schema = schema_of(body.response_format)
    tools = tools_of(body)
    stop = stops_of(body.stop)
    turns = await asyncio.to_thread(to_turns, body.messages, state.agent.allow_remote_images)
    if tools:
        try:
            turns, schema, _ = with_tools(
                turns, tools, body.tool_choice, parallel=body.parallel_tool_calls, answer=schema
            )
        except RecursionError:
            raise ApiError(400, "tools: a function's parameters nest too deeply") from None
    max_tokens = body.max_completion_tokens or body.max_tokens or state.agent.preset.planner.max_new_tokens
    cache_key = request.headers.get("x-duogen-session") or body.prompt_cache_key or body.user
    completion_id = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    slot = await Slot(state.gates["planner"]).enter()  # schemas compile inside: a flood of them waits too
    headers = {"x-duogen-queue-wait-ms": f"{slot.waited * 1000:.1f}"}
    gone = threading.Event()  # a streaming client hung up: decoding ends at the next piece

    def run() -> None:
        """The model call (in a worker thread); its progress and end go to ``queue``: ``token`` (text),
        ``call`` (a piece of a tool call), then ``done`` with the message and its finish reason."""

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        try:
            _compile_schema(planner, schema, "tools" if tools else "response_format")
            if hasattr(planner, "check_context"):  # too long: a 400, streamed or not (a remote planner's server says)
                planner.check_context(turns)
            put("start", None)
            text = (lambda piece: put("token", piece)) if body.stream else None
            reader: _ToolTurn | _UpToStop | None = None
            if tools:
                calls = (lambda piece: put("call", piece)) if body.stream else None
                reader = _ToolTurn(stop, text, calls, gone=gone.is_set)
            elif stop or text is not None:  # a JSON answer decodes on to its end; its text is cut
                reader = _UpToStop(stop, text or (lambda piece: None), halt=schema is None, gone=gone.is_set)
            on_token = None if reader is None else reader.feed
            if reader is not None and not tools and schema is not None:  # JSON, streamed as JSON
                controls, feed = JsonControls(), reader.feed
                on_token = lambda piece: feed(controls.feed(piece))  # noqa: E731
            out = planner.generate(
                turns, schema, max_new_tokens=max_tokens, seed=body.seed,
                on_token=on_token, cache_key=cache_key, client_schema=True,
            )  # fmt: skip
            if reader is not None:
                reader.flush()
            if not tools and schema is not None:
                out.text = JsonControls().feed(out.text)
            late = isinstance(reader, _ToolTurn) and reader.state == "whole"
            message, reason = _answer(out, reader, stop, max_tokens)
            if late and body.stream:
                for kind, piece in _late_pieces(message, reader.streamed):  # type: ignore[union-attr]
                    put(kind, piece)  # a layout read whole: what did not stream, sent now
            put("done", (out, message, reason))
        except BaseException as e:  # answered as an HTTP error, or reported in the stream
            put("error", e)

    in_thread(slot, run)
    first = await queue.get()
    if first[0] == "error":  # a schema the grammar compiler refuses: 400 before anything streams
        raise api_error(first[1])

    if not body.stream:
        kind, value = await queue.get()
        if kind == "error":
            raise api_error(value)
        out, message, reason = value
        return JSONResponse(
            {
                "id": completion_id, "object": "chat.completion", "created": created, "model": state.planner_id,
                "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": reason,
                             "logprobs": None}],
                "usage": _usage(out),
            },
            headers=headers,
        )  # fmt: skip

    def chunk(delta: dict[str, Any], reason: str | None = None, usage: Any = None) -> str:
        data: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": state.planner_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
        }  # fmt: skip
        if usage is not None:
            data["choices"], data["usage"] = [], usage
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> Any:
        # No await may stand between a hang-up and the end of this generator: the model call ends at
        # its next piece (``gone``), in its thread, and its slot is given back then (``in_thread``).
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    yield chunk({"content": value})
                elif kind == "call":
                    yield chunk({"tool_calls": [_call_delta(value)]})
                elif kind == "done":
                    out, _, reason = value
                    yield chunk({}, reason)
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield chunk({}, usage=_usage(out))
                    break
                else:
                    err = api_error(value)
                    yield f"data: {json.dumps(error_body(err.message, err.kind, err.code))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            gone.set()

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _answer(out: Any, reader: Any, stop: list[str], max_tokens: int) -> tuple[dict[str, Any], str]:
    """The assistant message (``content``, or ``tool_calls`` with ``content`` null) and its finish
    reason: ``tool_calls``, ``stop`` (the answer's end or a stop sequence) or ``length``."""
    from duogen_agents.models.chat_model import _ToolTurn, up_to_stop

    cut = out.num_tokens >= max_tokens or not out.complete
    text = out.text
    if isinstance(reader, _ToolTurn):
        streamed = reader.state != "whole"
        if not streamed:  # another layout (a served planner's grammar): read whole
            try:
                reader.read_whole(text)
            except ValueError:
                if not reader.finished_calls()[0]:  # else: cut after calls that streamed whole, which stay
                    return {"content": text}, "length"
        whole, partial = reader.finished_calls()
        if whole or partial is not None:  # and the one cut at max_tokens, with its arguments so far (as OpenAI's)
            calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                     for c in [*whole, *([partial] if partial else [])]]  # fmt: skip
            return {"content": None, "tool_calls": calls}, "tool_calls" if reader.state == "end" else "length"
        if reader.kind == "answer":  # JSON under the response_format
            return {"content": reader.answer}, "stop" if reader.state == "end" else "length"
        if streamed:
            return {"content": "".join(reader.text)}, "stop" if reader.whole else "length"
        text = reader.text[0] if reader.text else ""  # read whole: its text, if any
    text, stopped = up_to_stop(text, stop)
    return {"content": text}, "length" if cut and not stopped else "stop"


def _call_delta(piece: dict[str, Any]) -> dict[str, Any]:
    """A piece of a tool call (``_ToolTurn``'s) as OpenAI streams one: the first with its id and name."""
    if piece["name"] is not None:
        return {"index": piece["index"], "id": piece["id"], "type": "function",
                "function": {"name": piece["name"], "arguments": ""}}  # fmt: skip
    return {"index": piece["index"], "function": {"arguments": piece["args"]}}


def _late_pieces(message: dict[str, Any], streamed: int) -> list[tuple[str, Any]]:
    """What of a message read whole at the end did not stream (the calls after the first
    ``streamed``, or its text), as the stream's pieces."""
    if message.get("tool_calls"):
        pieces: list[tuple[str, Any]] = []
        for i, call in enumerate(message["tool_calls"][streamed:], start=streamed):
            fn = call["function"]
            pieces.append(("call", {"name": fn["name"], "args": "", "id": call["id"], "index": i}))
            pieces.append(("call", {"name": None, "args": fn["arguments"], "id": None, "index": i}))
        return pieces
    return [("token", message["content"])] if message["content"] else []


# ---- images -------------------------------------------------------------------------------------------


def _size(state: ServerState, size: str | None) -> tuple[int, int] | None:
    if size in (None, "", "auto"):
        return None
    try:
        w, h = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size {size!r}: use WIDTHxHEIGHT, e.g. 1024x1024") from None
    if not (16 <= w <= 4096 and 16 <= h <= 4096):
        raise ApiError(400, f"size {size!r}: each side from 16 to 4096 pixels")
    return w, h


def _b64_png(image: Any, size: tuple[int, int] | None) -> str:
    from PIL import Image

    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def _draw(
    state: ServerState, prompt: str, kind: str, references: list[Any], n: int, size: Any, seed: int | None
) -> JSONResponse:
    from duogen_agents.models.protocols import refusal

    tool = state.agent.image_tool
    if problem := refusal(getattr(tool, "capabilities", {}), kind, len(references)):
        raise ApiError(400, problem)
    base_seed = state.agent.preset.seed if seed is None else seed
    slot = await Slot(state.gates["image"]).enter()

    def draw_all() -> list[str]:
        out = []
        for i in range(n):
            drawing = tool.draw(prompt, kind=kind, references=references, seed=base_seed + i)  # type: ignore[arg-type]
            image = getattr(drawing, "image", drawing)
            out.append(_b64_png(image, size))
        return out

    pictures = await asyncio.shield(in_thread(slot, draw_all))
    return JSONResponse(
        {"created": int(time.time()), "data": [{"b64_json": p} for p in pictures]},
        headers={"x-duogen-queue-wait-ms": f"{slot.waited * 1000:.1f}"},
    )


@router.post("/v1/images/generations")
async def images_generations(body: ImageRequest, request: Request) -> Any:
    state = _state(request)
    _check_model(state, body.model, "image")
    return await _draw(state, body.prompt, "generate", [], body.n, _size(state, body.size), body.seed)


@router.post("/v1/images/edits")
async def images_edits(request: Request) -> Any:
    from duogen_agents.inputs import decode_image

    state = _state(request)
    form = await request.form(max_files=MAX_IMAGES_PER_REQUEST + 1, max_fields=64)
    try:
        files = [f for key in ("image", "image[]") for f in form.getlist(key) if not isinstance(f, str)]
        if not files:
            raise ApiError(400, "images/edits needs one or more image files (multipart field 'image' or 'image[]')")
        if len(files) > MAX_IMAGES_PER_REQUEST:
            raise ApiError(400, f"at most {MAX_IMAGES_PER_REQUEST} images per request")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if form.get("mask") is not None:
            raise ApiError(400, "mask is not supported: describe the change in the prompt")
        try:
            body = ImageRequest.model_validate(
                {k: fields[k] for k in ("prompt", "model", "n", "size", "response_format", "seed") if k in fields}
            )
        except ValidationError as e:
            raise ApiError(400, validation_line(e.errors())) from None
        kind = fields.get("kind", "edit")
        if kind not in ("generate", "edit", "continue"):
            raise ApiError(400, f"kind {kind!r}: use edit, generate or continue")
        _check_model(state, body.model, "image")
        references = []
        budget = PixelBudget()
        for f in files:
            data = await f.read()
            budget.take(data, "image")
            try:
                references.append(await asyncio.to_thread(decode_image, data, f.filename or "image"))
            except InputImageError as e:
                raise ApiError(400, str(e)) from None
    finally:
        await form.close()
    return await _draw(state, body.prompt, kind, references, body.n, _size(state, body.size), body.seed)
