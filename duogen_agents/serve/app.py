"""``duogen serve``: one process's models and agent over HTTP (FastAPI on uvicorn).

Two surfaces on one port:

- **OpenAI-compatible models** (what vLLM, SGLang and vLLM-Omni speak, so one ``duogen serve`` can be
  another ``duogen``'s remote planner and image model): ``GET /v1/models``, ``POST
  /v1/chat/completions`` (``response_format`` json_schema decoded under the planner's grammar,
  streaming), ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (multipart, several
  images).
- **The agent** (``/v1/sessions...``): send a turn to a persisted session and stream its events as
  server-sent events, fetch documents (json, html, md) and images by id, list, fork, delete, resume
  and cancel sessions.

Around them: ``/health``; bearer tokens from ``DUOGEN_API_KEY`` (comma-separated for several; binding
anything but loopback without one is refused at start); a request body limit (413); a bounded queue in
front of the planner, the image model and the turns (429 with ``Retry-After`` when full); no CORS
unless origins are given; graceful shutdown (at SIGTERM or Ctrl-C new turns get 503; running turns go
on for ``grace`` seconds, then stop after their current step: checkpointed, ``interrupted``, and
resumable on any worker; their clients get the error as the last event or as a 503).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from duogen_agents.errors import (
    ConfigError,
    DuogenError,
    GenerationError,
    InputImageError,
    PromptTooLongError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    SessionStateError,
    StorageError,
    TurnStoppedError,
)
from duogen_agents.models.remote import for_clients
from duogen_agents.serve.auth import API_KEY_ENV, api_keys_from_env, check_bind, is_loopback
from duogen_agents.serve.gate import Gate, QueueFull
from duogen_agents.validation import validation_line

if TYPE_CHECKING:
    from fastapi import FastAPI

    from duogen_agents.agent import Agent
    from duogen_agents.sessions import Sessions

log = logging.getLogger("duogen.serve")

DEFAULT_MAX_BODY_MB = 32.0
SHUTDOWN_MARGIN_S = 60  # after the grace: time for a stopped turn to end its step
__all__ = ["API_KEY_ENV", "ServeSettings", "api_keys_from_env", "check_bind", "create_app", "is_loopback", "serve"]


@dataclass
class ServeSettings:
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    queue: int = 16  # requests that may wait for each model
    turns: int = 4  # turns that run at once (their model calls still take turns per device)
    turn_queue: int = 32
    cors_origins: tuple[str, ...] = ()
    grace_s: float = 30.0
    session_wait_s: float = 0.0  # how long a turn waits for a session another turn is writing


class ApiError(Exception):
    """An error answered in the OpenAI error shape: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers: dict[str, str] = {}


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def api_error(e: BaseException) -> ApiError:
    """The HTTP answer for one of the library's errors (its one-line message, never a traceback)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        err = ApiError(429, str(e), "rate_limit_error", "queue_full")
        err.headers["Retry-After"] = str(e.retry_after)
        return err
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    message = for_clients(message, log)  # the operator's log reads where; the client does not
    if isinstance(e, SessionNotFoundError):
        if (missing := getattr(e, "session_id", None)) is not None:  # the CLI's advice (`duogen sessions list`)
            message = f"no session {missing!r}; GET /v1/sessions lists the sessions"
        return ApiError(404, message, "not_found_error", "session_not_found")
    if isinstance(e, SessionBusyError):
        if (busy := getattr(e, "session_id", None)) is not None:  # the CLI's advice and the holder's pid
            message = f"session {busy!r} is busy: another turn is writing it; try again when it finishes"
        return ApiError(409, message, "conflict_error", "session_busy")
    if isinstance(e, SessionStateError):
        return ApiError(409, message, "conflict_error", "session_state")
    if isinstance(e, TurnStoppedError):
        return ApiError(503, message, "server_error", "turn_stopped")
    if isinstance(e, SessionExistsError):
        return ApiError(409, message, "conflict_error", "session_exists")
    if isinstance(e, PromptTooLongError):
        return ApiError(400, message, "invalid_request_error", "context_length_exceeded")
    if isinstance(e, (ConfigError, InputImageError)):
        return ApiError(400, message)
    if isinstance(e, GenerationError):
        return ApiError(500, message, "generation_error")
    if isinstance(e, StorageError):
        return ApiError(500, message, "storage_error")
    if isinstance(e, DuogenError):
        return ApiError(500, message, "server_error")
    # Not one of ours: a bug. The client gets its type; the operator's log gets the traceback.
    log.error("internal error answered as 500", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


# ---- ASGI middleware: auth and body size (outermost, before FastAPI parses anything) ----------------


class GuardMiddleware:
    """Before FastAPI parses anything: the bearer-token check (every path but ``/health``), the Host
    check of a loopback server without tokens (no DNS rebinding: a web page whose name resolves to
    127.0.0.1 must not read the sessions), and the request body limit (413, chunked bodies too)."""

    def __init__(self, app: Any, *, api_keys: tuple[str, ...], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body = max_body_bytes

    async def _reply(self, send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
        raw = json.dumps(body).encode()
        base = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": base + headers})
        await send({"type": "http.response.body", "body": raw})

    def _authorised(self, headers: dict[bytes, bytes], path: str) -> bool:
        if not self.keys or path == "/health":
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # constant-time, and every key is compared
            ok |= hmac.compare_digest(token, key)
        return ok

    def _local_names(self, headers: dict[bytes, bytes]) -> bool:
        """Without tokens, only requests addressed to a loopback name, from no page or a loopback page."""
        if self.keys:
            return True
        host = _hostname(headers.get(b"host", b"").decode("latin-1"))
        if not is_loopback(host):
            return False
        origin = headers.get(b"origin")
        if origin is None or origin == b"null":
            return origin is None
        return is_loopback(_hostname(origin.decode("latin-1").split("://", 1)[-1]))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        if not self._local_names(headers):
            await self._reply(
                send, 403, error_body("this server answers loopback names only (set DUOGEN_API_KEY to serve others)",
                                      "permission_error", "host_not_allowed"), [],
            )  # fmt: skip
            return
        if not self._authorised(headers, scope.get("path", "")):
            await self._reply(
                send, 401, error_body("missing or wrong bearer token", "authentication_error", "invalid_api_key"),
                [(b"www-authenticate", b"Bearer")],
            )  # fmt: skip
            return
        too_large = error_body(f"request body over {self.max_body} bytes", "invalid_request_error", "too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = self.max_body + 1
            if declared > self.max_body:
                await self._reply(send, 413, too_large, [])
                return
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read the body here, up to the limit, then hand it on.
        messages: list[Any] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                await self._reply(send, 413, too_large, [])
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def _hostname(host: str) -> str:
    """``host`` of a Host header or an origin without its port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---- the app ------------------------------------------------------------------------------------------


class ServerState:
    """What the routes share: the agent, the sessions database, the gates, the settings."""

    def __init__(self, agent: Agent, sessions: Sessions, settings: ServeSettings) -> None:
        self.agent = agent
        self.sessions = sessions
        self.settings = settings
        self.gates = {
            "planner": Gate("planner", 1, settings.queue),
            "image": Gate("image", 1, settings.queue),
            "turns": Gate("turns", settings.turns, settings.turn_queue),
        }
        self.closing = False
        self.stop_turns = threading.Event()  # set when the shutdown grace is over

    def begin_shutdown(self, grace_s: float) -> None:
        """New turns get 503 from now on; running ones go on for ``grace_s`` seconds, then stop after
        their current step (checkpointed, ``interrupted``: resumable on any worker)."""
        if self.closing:
            return
        self.closing = True
        timer = threading.Timer(grace_s, self.stop_turns.set)
        timer.daemon = True
        timer.start()

    @property
    def planner_id(self) -> str:
        return self.agent.preset.name

    @property
    def image_id(self) -> str:
        return f"{self.agent.preset.name}-image"


def create_app(agent: Agent, sessions: Sessions, settings: ServeSettings | None = None) -> FastAPI:
    """The ASGI app over ``agent`` (its models) and ``sessions`` (the database its turns persist in)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from duogen_agents.serve import agent_api, openai_api

    settings = settings or ServeSettings()
    state = ServerState(agent, sessions, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        state.begin_shutdown(0.0)  # served without `serve` (no signal hook): stop what still runs

    app = FastAPI(title="duogen serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.duogen = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(DuogenError)
    async def _duogen_error(request: Request, e: DuogenError) -> JSONResponse:
        err = api_error(e)
        return JSONResponse(error_body(err.message, err.kind, err.code), status_code=err.status, headers=err.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, e: QueueFull) -> JSONResponse:
        err = api_error(e)
        return JSONResponse(error_body(err.message, err.kind, err.code), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(validation_line(e.errors()), "invalid_request_error"), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        # Starlette's own answers (404 unknown route, 405 wrong method, a multipart form over its
        # limits) in the OpenAI error shape too.
        kinds = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}
        kind = kinds.get(e.status_code, "invalid_request_error" if e.status_code < 500 else "server_error")
        body = error_body(" ".join(str(e.detail).split()), kind)
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "closing" if state.closing else "ok",
            "preset": agent.preset.name,
            "models": {"planner": state.planner_id, "image": state.image_id},
            "database": sessions.db.backend,
            "queues": {name: gate.stats() for name, gate in state.gates.items()},
        }

    app.include_router(openai_api.router)
    app.include_router(agent_api.router)
    app.add_middleware(GuardMiddleware, api_keys=settings.api_keys, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # added last, so outermost: preflights and refusals carry its headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
            allow_headers=["*"], allow_credentials=False,
        )  # fmt: skip
    return app


def serve(
    preset: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    database: str | None = None,
    home: str | None = None,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Load the preset's models, open the database and serve until interrupted (SIGINT/SIGTERM)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError("duogen serve needs its extra: pip install 'duogen-agents[serve]'") from e
    from duogen_agents.agent import Agent
    from duogen_agents.sessions import Sessions

    settings = settings or ServeSettings()
    if not settings.api_keys:
        settings.api_keys = api_keys_from_env()
    check_bind(host, settings.api_keys)  # before loading anything
    agent = Agent.from_preset(preset, home=home)
    sessions = Sessions.open(database, home=agent.home)
    app = create_app(agent, sessions, settings)
    state: ServerState = app.state.duogen

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_shutdown(settings.grace_s)  # at the signal, not once connections have drained
            super().handle_exit(sig, frame)

    # Connections stay open past the grace until the stopped turns have sent their last event.
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
        timeout_graceful_shutdown=math.ceil(settings.grace_s) + SHUTDOWN_MARGIN_S,
    )  # fmt: skip
    try:
        Server(config).run()
    finally:
        sessions.close()
