"""The agent over HTTP: persisted sessions, their turns as server-sent events, documents and images.

==========================================  =====================================================
``GET /v1/sessions``                        the sessions, most recently updated first
``POST /v1/sessions``                       a new session id (``{"id": ...}`` to choose it); the
                                            session is stored by its first turn, as in Python
``GET /v1/sessions/{id}``                   the session and its turns, each with its document
``POST /v1/sessions/{id}/turns``            send a message: ``{"prompt", "mode", "seed", "images":
                                            [data: URL or image id], "stream"}``; the document, or
                                            with ``stream`` the turn's events (SSE) ending with it
``POST /v1/sessions/{id}/resume``           continue an unfinished turn (``{"stream"}``)
``POST /v1/sessions/{id}/cancel``           drop an unfinished turn
``POST /v1/sessions/{id}/fork``             copy to a new id (``{"id": ...}`` to choose it)
``DELETE /v1/sessions/{id}``                delete with its checkpoints and unshared images
``GET /v1/sessions/{id}/document``          ``?format=json`` (default), ``html`` or ``md``
``GET /v1/images/{image_id}``               a stored PNG by its 64-hex id
==========================================  =====================================================

Events are the public protocol of ``Agent.stream`` (``token``, ``plan``, ``text``, ``image_start``,
``image_progress``, ``image_ready``, ``image_rejected``, ``finish``, ``document``), one SSE message each
(``event:`` the name, ``data:`` the event as JSON, images as ids), then ``event: end``; a failure is
``event: error`` with ``{"error": {"message", ...}}`` and the turn stays resumable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from duogen_agents.models.remote import withhold_urls
from duogen_agents.serve.app import ApiError, ServerState, api_error, error_body
from duogen_agents.serve.gate import Slot, in_thread

router = APIRouter()
MAX_TURN_IMAGES = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewSession(_Strict):
    id: str | None = None


class TurnRequest(_Strict):
    prompt: str
    mode: str | None = None
    seed: StrictInt | None = None  # true is not a seed
    images: list[str] = Field(default_factory=list, max_length=MAX_TURN_IMAGES)
    stream: bool = False


class ResumeRequest(_Strict):
    stream: bool = False


def jsonable(value: Any) -> Any:
    """An event or record as JSON-ready data (pydantic models dumped, dataclasses as dicts)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _state(request: Request) -> ServerState:
    return request.app.state.duogen


def _check_id(session_id: str) -> str:
    from duogen_agents.storage.database import check_session_id

    return check_session_id(session_id)


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


def _session(state: ServerState, session_id: str) -> Any:
    return state.agent.session(_check_id(session_id), database=state.sessions.db, wait=state.settings.session_wait_s)


def _info(state: ServerState, session_id: str) -> dict[str, Any]:
    info = state.sessions.get(session_id)
    return {**jsonable(info), "pending": info.pending}


@router.get("/v1/sessions")
async def list_sessions(request: Request) -> dict[str, Any]:
    state = _state(request)
    infos = await _call(state.sessions.list)
    return {"object": "list", "data": [{**jsonable(i), "pending": i.pending} for i in infos]}


@router.post("/v1/sessions", status_code=201)
async def new_session(request: Request, body: NewSession | None = None) -> dict[str, Any]:
    state = _state(request)
    body = body or NewSession()  # no body, or {}: a new id
    session_id = _check_id(body.id) if body.id is not None else secrets.token_hex(4)
    if await _call(state.sessions.exists, session_id):
        raise ApiError(409, f"session {session_id!r} exists already", "conflict_error", "session_exists")
    return {"id": session_id, "stored": False}


@router.get("/v1/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    _check_id(session_id)

    def read() -> dict[str, Any]:
        history = jsonable(state.sessions.turns(session_id))
        for turn in history:  # a failed turn's stored line may name a remote model's address (any process's)
            if turn.get("error"):
                turn["error"] = withhold_urls(turn["error"])
        return {**_info(state, session_id), "history": history}

    return await _call(read)


@router.delete("/v1/sessions/{session_id}")
async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    _check_id(session_id)
    await _call(state.sessions.get, session_id)  # 404 for an unknown one
    removed = await _call(state.sessions.delete, session_id, wait=state.settings.session_wait_s)
    await _call(state.agent.forget, session_id)  # waits for the device: never on the event loop
    return {"id": session_id, "deleted": True, "images_removed": removed}


@router.post("/v1/sessions/{session_id}/fork", status_code=201)
async def fork_session(session_id: str, request: Request, body: NewSession | None = None) -> dict[str, Any]:
    state = _state(request)
    _check_id(session_id)
    body = body or NewSession()  # no body, or {}: a new id
    if body.id is not None:
        _check_id(body.id)
    info = await _call(state.sessions.fork, session_id, body.id)
    return {**jsonable(info), "pending": info.pending}


@router.post("/v1/sessions/{session_id}/cancel")
async def cancel_turn(session_id: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    session = await _call(_session, state, session_id)
    await _call(state.sessions.get, session_id)
    return {"id": session_id, "cancelled": await _call(session.cancel)}


@router.get("/v1/sessions/{session_id}/document")
async def document(session_id: str, request: Request, format: Literal["json", "html", "md"] = "json") -> Response:
    from duogen_agents.export import to_html, to_json, to_markdown

    state = _state(request)
    _check_id(session_id)
    await _call(state.sessions.get, session_id)
    doc = await _call(state.sessions.document, session_id)
    if format == "html":
        return HTMLResponse(await _call(to_html, doc, state.agent.store))
    if format == "md":
        text = to_markdown(doc, link=lambda ref: f"/v1/images/{ref.id}")
        return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
    return Response(to_json(doc), media_type="application/json")


@router.get("/v1/images/{image_id}")
async def image(image_id: str, request: Request) -> Response:
    from duogen_agents.storage.images import is_image_id

    state = _state(request)
    if not is_image_id(image_id):
        raise ApiError(400, "an image id is 64 lowercase hex digits", code="invalid_image_id")
    if not await _call(state.agent.store.exists, image_id):
        raise ApiError(404, f"no image {image_id[:12]}", "not_found_error", "image_not_found")
    data = await _call(state.agent.store.read_bytes, image_id)
    return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=31536000, immutable"})


# ---- turns ----------------------------------------------------------------------------------------------


def _turn_images(state: ServerState, images: list[str]) -> list[Any]:
    """A client's images: ``data:`` URLs, or ids of images already in the store; never a path or a
    ``file://`` URL on this server."""
    from duogen_agents.serve.openai_api import PixelBudget
    from duogen_agents.storage.images import is_image_id

    out: list[Any] = []
    budget = PixelBudget()
    for i, value in enumerate(images):
        if is_image_id(value):
            if not state.agent.store.exists(value):
                raise ApiError(400, f"images[{i}]: no image {value[:12]} in the store")
            out.append({"type": "image", "file_id": value})
        elif value.startswith("data:"):
            budget.take_data_url(value, f"images[{i}]")
            out.append({"type": "image_url", "image_url": {"url": value}})
        elif state.agent.allow_remote_images and value.startswith(("http://", "https://")):
            out.append({"type": "image_url", "image_url": {"url": value}})
        else:
            raise ApiError(400, f"images[{i}]: give a data: URL or the 64-hex id of a stored image")
    return out


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _run_turn(state: ServerState, stream: bool, events: Callable[[Any], Iterator[dict[str, Any]]]) -> Any:
    """Run one turn (``events(stop)`` builds its event iterator) under the turns gate: the document,
    or SSE. The turn runs in a worker thread to its end even when the client goes away (its records
    are committed), or until the server's shutdown grace is over (it stops after a finished step)."""
    if state.closing:
        raise ApiError(503, "the server is shutting down; send the turn again later", "server_error", "closing")
    slot = await Slot(state.gates["turns"]).enter()
    loop = asyncio.get_running_loop()
    headers = {"x-duogen-queue-wait-ms": f"{slot.waited * 1000:.1f}"}
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def run() -> None:
        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        try:
            put("start", None)
            for event in events(state.stop_turns):
                if stream:  # a path on this machine is no business of a client's (images go as ids)
                    put("event", jsonable({k: v for k, v in event.items() if k != "path"}))
                elif event.get("event") == "document":
                    put("document", jsonable(event["document"]))
            put("end", None)
        except BaseException as e:  # an HTTP error, or an error event; the turn's checkpoints stay for resume
            put("error", e)

    in_thread(slot, run)
    await queue.get()  # "start"
    first = await queue.get()
    if first[0] == "error":  # refused before it began (busy session, bad mode...), or failed: an HTTP error
        raise api_error(first[1])
    if not stream:
        document = first[1] if first[0] == "document" else None
        if first[0] == "document":
            kind, value = await queue.get()
            if kind == "error":
                raise api_error(value)
        return JSONResponse(document, headers=headers)

    async def body() -> Any:
        # No await may stand between a hang-up and the end of this generator (see ``in_thread``).
        pending: tuple[str, Any] | None = first
        while True:
            kind, value = pending if pending is not None else await queue.get()
            pending = None
            if kind == "event":
                yield _sse(str(value.get("event", "message")), value)
            elif kind == "end":
                yield _sse("end", {})
                break
            else:
                err = api_error(value)
                yield _sse("error", error_body(err.message, err.kind, err.code))
                break

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


@router.post("/v1/sessions/{session_id}/turns")
async def send_turn(session_id: str, body: TurnRequest, request: Request) -> Any:
    state = _state(request)
    session = await _call(_session, state, session_id)
    images = await _call(_turn_images, state, body.images)

    def events(stop: Any) -> Iterator[dict[str, Any]]:
        return session._stream(body.prompt, body.mode, images, body.seed, events=body.stream, stop=stop)

    return await _run_turn(state, body.stream, events)


@router.post("/v1/sessions/{session_id}/resume")
async def resume_turn(session_id: str, request: Request, body: ResumeRequest | None = None) -> Any:
    state = _state(request)
    body = body or ResumeRequest()  # no body, or {}: not streamed
    session = await _call(_session, state, session_id)
    await _call(state.sessions.get, session_id)
    return await _run_turn(state, body.stream, lambda stop: session.resume(stop=stop))
