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
unless origins are given; graceful shutdown (new turns are refused with 503 while running turns finish
their current step and checkpoint, within ``grace`` seconds).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from duogen_agents.errors import (
    ConfigError,
    DuogenError,
    GenerationError,
    InputImageError,
    SessionBusyError,
    SessionNotFoundError,
    SessionStateError,
    StorageError,
)
from duogen_agents.serve.auth import API_KEY_ENV, api_keys_from_env, check_bind, is_loopback
from duogen_agents.serve.gate import Gate, QueueFull

if TYPE_CHECKING:
    from fastapi import FastAPI

    from duogen_agents.agent import Agent
    from duogen_agents.sessions import Sessions

DEFAULT_MAX_BODY_MB = 32.0
__all__ = ["API_KEY_ENV", "ServeSettings", "api_keys_from_env", "check_bind", "create_app", "is_loopback", "serve"]


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    queue: int = 16  # requests that may wait for each model
    turns: int = 4  # turns that run at once (their model calls still take turns per device)
    turn_queue: int = 32
    cors_origins: tuple[str, ...] = ()
    grace_s: float = 30.0
    session_wait_s: float = 0.0  # how long a turn waits for a session another turn is writing
    extra: dict[str, Any] = field(default_factory=dict)


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
    if isinstance(e, SessionNotFoundError):
        return ApiError(404, message, "not_found_error", "session_not_found")
    if isinstance(e, SessionBusyError):
        return ApiError(409, message, "conflict_error", "session_busy")
    if isinstance(e, SessionStateError):
        return ApiError(409, message, "conflict_error", "session_state")
    if isinstance(e, (ConfigError, InputImageError)):
        return ApiError(400, message)
    if isinstance(e, GenerationError):
        return ApiError(500, message, "generation_error")
    if isinstance(e, StorageError):
        return ApiError(500, message, "storage_error")
    if isinstance(e, DuogenError):
        return ApiError(500, message, "server_error")
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


# ---- ASGI middleware: auth and body size (outermost, before FastAPI parses anything) ----------------


class GuardMiddleware:
    """Bearer-token check (every path but ``/health``) and the request body limit (413)."""

    def __init__(self, app: Any, *, api_keys: tuple[str, ...], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body = max_body_bytes

    async def _reply(self, send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
        raw = json.dumps(body).encode()
        base = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": base + headers})
        await send({"type": "http.response.body", "body": raw})

    def _authorised(self, scope: dict[str, Any]) -> bool:
        if not self.keys or scope.get("path") == "/health":
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # constant-time, and every key is compared
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorised(scope):
            await self._reply(
                send, 401, error_body("missing or wrong bearer token", "authentication_error", "invalid_api_key"),
                [(b"www-authenticate", b"Bearer")],
            )  # fmt: skip
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_body(f"request body over {self.max_body} bytes", "invalid_request_error", "too_large")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = self.max_body + 1
            if declared > self.max_body:
                await self._reply(send, 413, too_large, [])
                return
        seen = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reply(send, 413, too_large, [])


class _BodyTooLarge(Exception):
    pass


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
        self.running_turns = 0

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

    from duogen_agents.serve import agent_api, openai_api

    settings = settings or ServeSettings()
    state = ServerState(agent, sessions, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        state.closing = True  # uvicorn stopped accepting; running turns finish their step and checkpoint

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
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{where}: {first.get('msg')}" if where else str(first.get("msg")),
                                       "invalid_request_error"), status_code=400)  # fmt: skip

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
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
            allow_headers=["*"], allow_credentials=False,
        )  # fmt: skip
    app.add_middleware(GuardMiddleware, api_keys=settings.api_keys, max_body_bytes=settings.max_body_bytes)
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
    settings.host, settings.port = host, port
    if not settings.api_keys:
        settings.api_keys = api_keys_from_env()
    check_bind(host, settings.api_keys)  # before loading anything
    agent = Agent.from_preset(preset, home=home)
    sessions = Sessions.open(database, home=agent.home)
    app = create_app(agent, sessions, settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(settings.grace_s),
        access_log=log_level == "debug",
    )  # fmt: skip
    try:
        uvicorn.Server(config).run()
    finally:
        sessions.close()
