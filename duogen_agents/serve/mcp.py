"""``duogen mcp``: the agent as an MCP server (the official ``mcp`` SDK, 2.x), over stdio or Streamable HTTP.

Tools: ``visual_plan`` and ``answer_with_images`` (a turn of a persisted session, new or given),
``continue_session`` (a turn of an existing session), ``list_sessions``, and ``draw_image`` (one image
from the image tool, optionally conditioned on stored images). A turn's result is its text as text
content and its pictures as PNG image content, after a first text line naming the session and the
document (``SESSION#TURN``); structured content carries the same ids. Turns stream progress
notifications when the client sent a progress token. Model calls run in worker threads, so the event
loop keeps serving (the library itself serialises the calls per device). A ``DuogenError`` becomes a
tool error carrying its one line.

HTTP: the SDK's Streamable HTTP app at ``/mcp``. With ``$DUOGEN_API_KEY`` set, every request needs
``Authorization: Bearer <key>`` (else 401); binding a host other than loopback without a key is refused.

This module imports ``mcp`` only when a server is built, so ``import duogen_agents`` never needs it.
(Annotations here are evaluated, not postponed: the SDK reads the tool functions' signatures.)
"""

import base64
import contextlib
import hmac
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from duogen_agents.errors import (
    ConfigError,
    DuogenError,
    SessionBusyError,
    SessionNotFoundError,
    SessionStateError,
)
from duogen_agents.serve.auth import API_KEY_ENV, api_keys_from_env, check_bind, is_loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MCP_PATH = "/mcp"
SERVER_NAME = "duogen"
INSTALL_HINT = "pip install 'duogen-agents[serve]'"
# A progress notification that has not gone out by then never will (the call was cancelled, or its
# client left): the turn goes on without it, and without further ones.
PROGRESS_TIMEOUT_S = 5.0

log = logging.getLogger("duogen.mcp")

Mode = Literal["interleaved", "visual-plan", "draft"]
SessionId = Annotated[
    str | None,
    Field(description="session to continue or create (1-64 letters, digits, '.', '_', '-'); default: a new session"),
]
Prompt = Annotated[str, Field(description="what to answer", min_length=1)]
Seed = Annotated[int | None, Field(description="seed for reproducible output (default: the preset's)", ge=0)]


# ---- checks that need no SDK ----------------------------------------------------------------------


def api_keys() -> tuple[str, ...]:
    """The bearer tokens in ``$DUOGEN_API_KEY`` (comma-separated, as for ``duogen serve``)."""
    return api_keys_from_env()


def check_binding(host: str, tokens: tuple[str, ...]) -> None:
    """Refuse to serve a host other than loopback without a token."""
    check_bind(host, tokens, "serve MCP")


def _require_sdk() -> None:
    try:
        import mcp  # noqa: F401
    except ImportError:
        raise ConfigError(f"duogen mcp needs the mcp package: {INSTALL_HINT}") from None
    try:
        import mcp.server.mcpserver  # noqa: F401
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("mcp")
        except PackageNotFoundError:  # pragma: no cover
            found = "unknown"
        raise ConfigError(f"duogen mcp needs mcp 2 or newer (found {found}): pip install -U 'mcp>=2'") from None


# ---- HTTP: a bearer token in front of the SDK's app ------------------------------------------------


class BearerAuth:
    """ASGI middleware: every HTTP (and websocket) request needs ``Authorization: Bearer <token>``
    with one of ``tokens``; lifespan events pass through. Tokens are compared in constant time."""

    def __init__(self, app: Any, tokens: tuple[str, ...]) -> None:
        if not tokens:
            raise ValueError("BearerAuth needs at least one token")
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, credentials = bytes(value).partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                given = credentials.strip()
                # Every token is compared (no early exit), each in constant time.
                return bool(sum(hmac.compare_digest(given, t) for t in self.tokens))
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"error": "unauthorized: send Authorization: Bearer <DUOGEN_API_KEY>"}'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="duogen"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ---- results ----------------------------------------------------------------------------------------


def _one_line(e: BaseException, where: str) -> str:
    """An error as the one line a caller sees (as the CLI prints it, but without the addresses of the
    remote models: the operator's log has those), never a traceback."""
    from duogen_agents.models.remote import for_clients, withhold_upstreams

    line = _full_line(e, where)
    if isinstance(e, DuogenError):
        return for_clients(line, log)
    log.error("tool failed: %s", line, exc_info=bool(os.environ.get("DUOGEN_DEBUG")))
    return withhold_upstreams(line)


def _full_line(e: BaseException, where: str) -> str:
    if isinstance(e, SessionBusyError) and (busy := getattr(e, "session_id", None)) is not None:
        # as duogen serve says it: not the CLI's advice, nor the pid of the process that writes it
        return f"session {busy!r} is busy: another turn is writing it; try again when it finishes"
    if isinstance(e, SessionNotFoundError) and (missing := getattr(e, "session_id", None)) is not None:
        return f"no session {missing!r}; list_sessions shows the sessions"  # the tool, not the CLI's command
    if isinstance(e, DuogenError):
        return str(e)
    from duogen_agents.storage.database import describe_failure

    if (line := describe_failure(e, where)) is not None:
        return line
    first = (str(e).strip().splitlines() or [""])[0]
    return f"internal error: {type(e).__name__}: {first}"


def _png(store: Any, ref: Any) -> Any:
    from mcp.types import ImageContent

    return ImageContent(type="image", data=base64.b64encode(store.read_bytes(ref)).decode("ascii"), mime_type=ref.mime)


def document_result(doc: Any, store: Any, session_id: str, turn: int | None) -> Any:
    """A turn's ``InterleavedDocument`` as a ``CallToolResult``: a header line (session, document id,
    images), then the blocks in order, text as text content and images (drafts too) as PNG images."""
    from mcp.types import CallToolResult, TextContent

    from duogen_agents.document import ImageBlock

    doc_id = f"{session_id}#{turn}" if turn is not None else session_id
    images = doc.images
    header = (
        f"session: {session_id}; document: {doc_id}; mode: {doc.mode}; preset: {doc.preset}; "
        f"{len(images)} image(s)" + (f": {', '.join(b.image.short for b in images)}" if images else "")
    )
    if doc.title:
        header += f"\ntitle: {doc.title}"
    content: list[Any] = [TextContent(type="text", text=header)]
    for block in doc.blocks:
        if isinstance(block, ImageBlock):
            label = "draft sketch" if block.draft else "image"
            content.append(TextContent(type="text", text=f"[{label} {block.image.short}] {block.prompt}"))
            content.append(_png(store, block.image))
        else:
            content.append(TextContent(type="text", text=block.text))
    structured = {
        "session_id": session_id,
        "document_id": doc_id,
        "turn": turn,
        "mode": doc.mode,
        "title": doc.title,
        "images": [
            {"id": b.image.id, "short_id": b.image.short, "prompt": b.prompt, "draft": b.draft, "step": b.step}
            for b in images
        ],
        "text": doc.text,
    }
    return CallToolResult(content=content, structured_content=structured)


def error_result(message: str) -> Any:
    from mcp.types import CallToolResult, TextContent

    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


class TurnProgress:
    """Turns a turn's events into progress notifications: an increasing value (images started, plus
    the fraction of the current image's steps), no total (how many images a turn draws is the
    planner's choice), and a short message."""

    def __init__(self, emit: Callable[[float, float | None, str], None]) -> None:
        self.emit = emit
        self.last = 0.0
        self.started = 0

    def _send(self, value: float, total: float | None, message: str) -> None:
        if value > self.last:  # the protocol wants each notification's progress to increase
            self.last = value
            self.emit(value, total, message)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "plan":
            self._send(self.last + 0.5, None, f"plan: {event.get('title')} ({len(event.get('steps') or [])} steps)")
        elif kind == "image_start":
            self.started += 1
            label = "draft" if event.get("origin") == "draft" else "image"
            self._send(
                float(self.started), None, f"drawing {label} {event.get('index')}: {event.get('prompt', '')}"[:200]
            )
        elif kind == "image_progress":
            total = max(int(event.get("total") or 1), 1)
            step = min(int(event.get("step") or 0), total)
            frac = step / (total + 1)
            self._send(self.started + frac, None, f"image {event.get('index')}: step {step}/{total}")
        elif kind == "image_rejected":
            self._send(self.started + 0.99, None, f"redrawing: {event.get('note', '')}"[:200])
        elif kind == "image_ready":
            self._send(self.started + 0.995, None, f"image {event.get('index')} ready")


# ---- the server ---------------------------------------------------------------------------------------


class DuogenMCP:
    """The tools over one loaded ``Agent`` and one sessions database."""

    def __init__(self, agent: Any, sessions: Any, *, wait: float | None = None, where: str = "") -> None:
        self.agent = agent
        self.sessions = sessions
        self.wait = wait
        self.where = where or str(agent.home)

    # -- blocking bodies (run in worker threads) --

    def turn(
        self,
        prompt: str,
        session_id: str | None,
        mode: str | None,
        seed: int | None,
        on_event: Callable[[dict[str, Any]], None],
        *,
        must_exist: bool = False,
    ) -> Any:
        from duogen_agents.storage.database import check_session_id

        if session_id is not None:
            check_session_id(session_id)
        if must_exist and (session_id is None or not self.sessions.exists(session_id)):
            raise SessionNotFoundError(f"no session {session_id!r}; list_sessions shows the sessions")
        if session_id is not None and self.sessions.unfinished_turn(session_id) is not None:
            raise SessionStateError(
                f"session {session_id!r} has an unfinished turn (cut short: a client or server that left); "
                "finish_turn resumes it or drops it"
            )
        session = self.agent.session(session_id, database=self.sessions.db, wait=self.wait)
        return self._result(session, session.stream(prompt, mode=mode, seed=seed), on_event)

    def finish(self, session_id: str, action: str, on_event: Callable[[dict[str, Any]], None]) -> Any:
        """The unfinished turn of a session (a client or server that left mid-turn): resumed to its
        answer, or dropped (the session as it was before that message)."""
        from mcp.types import CallToolResult, TextContent

        from duogen_agents.storage.database import check_session_id

        check_session_id(session_id)
        if not self.sessions.exists(session_id):
            raise SessionNotFoundError(f"no session {session_id!r}; list_sessions shows the sessions")
        session = self.agent.session(session_id, database=self.sessions.db, wait=self.wait)
        if action == "resume":
            return self._result(session, session.resume(), on_event)
        if not session.cancel():
            raise SessionStateError(f"session {session_id!r} has no unfinished turn; nothing to drop")
        text = f"dropped the unfinished turn of session {session_id}: the session is as it was before it"
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content={"session_id": session_id, "dropped": True},
        )

    def _result(
        self, session: Any, events: Iterator[dict[str, Any]], on_event: Callable[[dict[str, Any]], None]
    ) -> Any:
        """A turn's events followed to its document, as the tool's result."""
        doc = None
        try:
            for event in events:
                if event.get("event") == "document":
                    doc = event["document"]
                elif event.get("event") != "token":
                    on_event(event)
        finally:
            events.close()  # type: ignore[attr-defined]
        assert doc is not None, "the turn's stream ended without a document"
        last = self.sessions.last_turn(session.id)
        return document_result(doc, self.agent.store, session.id, last.number if last is not None else None)

    def draw(
        self,
        prompt: str,
        kind: str,
        references: list[str],
        seed: int,
        emit: Callable[[float, float | None, str], None],
    ) -> Any:
        from mcp.types import CallToolResult, TextContent

        from duogen_agents.validation import check_prompt, check_seed

        check_prompt(prompt)
        check_seed(seed)
        renderer = self.agent.renderer
        last = [0]

        def on_step(step: int, total: int) -> None:
            if step > last[0]:
                last[0] = step
                emit(float(step), float(total), f"step {step}/{total}")

        with self.agent.store.lease():  # `duogen sessions gc` keeps what this call writes
            refs = renderer.resolve_ids(references, {})
            rendered = renderer.render(prompt, refs, kind=kind, seed=seed, on_step=on_step)
        ref = rendered.ref
        text = (
            f"image {ref.short} ({ref.width}x{ref.height}, {kind}, {rendered.drawing.family}); full id {ref.id}; "
            "pass it in references to keep the next image consistent with it"
        )
        structured = {
            "id": ref.id,
            "short_id": ref.short,
            "width": ref.width,
            "height": ref.height,
            "kind": kind,
            "references": [r.id for r in refs],
        }
        return CallToolResult(
            content=[TextContent(type="text", text=text), _png(self.agent.store, ref)], structured_content=structured
        )

    def list_sessions(self) -> Any:
        from mcp.types import CallToolResult, TextContent

        items = self.sessions.list()
        lines = [
            f"{s.id}: {s.title or '(untitled)'} [{s.mode}, {s.turns} turn(s), {s.images} image(s), "
            f"updated {s.updated_at.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC{', unfinished turn' if s.pending else ''}"
            f"{', malformed: changed outside duogen' if s.malformed else ''}]"
            for s in items
        ]
        structured = {
            "sessions": [
                {
                    "id": s.id,
                    "title": s.title,
                    "mode": s.mode,
                    "preset": s.preset,
                    "turns": s.turns,
                    "images": s.images,
                    "parent_id": s.parent_id,
                    "updated_at": s.updated_at.isoformat(),
                    "last_status": s.last_status,
                    "malformed": s.malformed,
                }
                for s in items
            ]
        }
        text = "\n".join(lines) if lines else "no sessions yet: visual_plan or answer_with_images starts one"
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured)

    # -- async plumbing --

    async def call(self, ctx: Any, body: Callable[[Callable[[float, float | None, str], None]], Any]) -> Any:
        """Run ``body(emit)`` in a worker thread; ``emit`` sends a progress notification from there.
        Errors come back as tool errors with one line."""
        import anyio
        import anyio.from_thread
        import anyio.to_thread

        silent = threading.Event()  # a notification that did not go out: the client is gone, send no more

        async def report(progress: float, total: float | None, message: str) -> None:
            try:
                with anyio.fail_after(PROGRESS_TIMEOUT_S):
                    await ctx.report_progress(progress, total, message)
            except Exception as e:  # a client that went away (or cancelled) must not fail, nor hold, the turn
                silent.set()
                log.debug("progress notification failed: %s", e)

        def emit(progress: float, total: float | None, message: str) -> None:
            if silent.is_set():
                return
            try:
                anyio.from_thread.run(report, progress, total, message)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # the call was cancelled (its task's cancellation comes back here): the
                silent.set()  # turn goes on without its progress, to be kept in its session

        try:
            return await anyio.to_thread.run_sync(body, emit)
        except Exception as e:
            return error_result(_one_line(e, self.where))

    def build(self) -> Any:
        """The ``MCPServer`` with its six tools."""
        from mcp.server.mcpserver import Context
        from mcp.types import CallToolResult, ToolAnnotations

        preset = self.agent.preset
        server = _server_class()(
            SERVER_NAME,
            title="duogen-agents",
            version=_version(),
            instructions=(
                "Answers with interleaved text and images (a multimodal planner and a diffusion image tool). "
                "Turns are kept in persisted sessions: pass session_id to continue one. "
                + (
                    f"Preset {preset.name!r} has random weights: its words and pictures are noise."
                    if preset.is_tiny
                    else ""
                )
            ),
            log_level="WARNING",
        )
        app = self
        turn_hints = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

        @server.tool(
            description="Plan a task as titled steps, each written and illustrated with an image. "
            "Returns the plan's text and images, the session id and the document id.",
            annotations=turn_hints,
        )
        async def visual_plan(
            prompt: Prompt, ctx: Context, session_id: SessionId = None, seed: Seed = None
        ) -> CallToolResult:
            def body(emit: Callable[[float, float | None, str], None]) -> Any:
                return app.turn(prompt, session_id, "visual-plan", seed, TurnProgress(emit))

            return await app.call(ctx, body)

        @server.tool(
            description="Answer with text and pictures interleaved (or, in draft mode, sketch first and "
            "answer in text). Returns the answer's text and images, the session id and the document id.",
            annotations=turn_hints,
        )
        async def answer_with_images(
            prompt: Prompt,
            ctx: Context,
            session_id: SessionId = None,
            mode: Annotated[Literal["interleaved", "draft"], Field(description="interleaved or draft")] = "interleaved",
            seed: Seed = None,
        ) -> CallToolResult:
            def body(emit: Callable[[float, float | None, str], None]) -> Any:
                return app.turn(prompt, session_id, mode, seed, TurnProgress(emit))

            return await app.call(ctx, body)

        @server.tool(
            description="Send a follow-up to an existing session: the planner sees its earlier turns and "
            "can reference their images. mode defaults to the session's mode.",
            annotations=turn_hints,
        )
        async def continue_session(
            session_id: Annotated[str, Field(description="an existing session (see list_sessions)")],
            prompt: Prompt,
            ctx: Context,
            mode: Annotated[Mode | None, Field(description="default: the session's mode")] = None,
            seed: Seed = None,
        ) -> CallToolResult:
            def body(emit: Callable[[float, float | None, str], None]) -> Any:
                return app.turn(prompt, session_id, mode, seed, TurnProgress(emit), must_exist=True)

            return await app.call(ctx, body)

        @server.tool(
            description="Finish a session's unfinished turn (one cut short when a client or the server left "
            "mid-turn; other tools refuse the session until then): resume continues it to its answer, "
            "discard drops it, leaving the session as it was before that message.",
            annotations=turn_hints,
        )
        async def finish_turn(
            session_id: Annotated[str, Field(description="a session with an unfinished turn (see list_sessions)")],
            ctx: Context,
            action: Annotated[Literal["resume", "discard"], Field(description="resume or discard")] = "resume",
        ) -> CallToolResult:
            def body(emit: Callable[[float, float | None, str], None]) -> Any:
                return app.finish(session_id, action, TurnProgress(emit))

            return await app.call(ctx, body)

        @server.tool(
            description="List the persisted sessions: id, title, mode, turns and images.",
            annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
        )
        async def list_sessions(ctx: Context) -> CallToolResult:
            return await app.call(ctx, lambda emit: app.list_sessions())

        @server.tool(
            description="Draw one image with the image tool. kind: generate (from the prompt), edit (change "
            "the reference image) or continue (the next frame after the references). references: ids (full "
            "or 12-character short ids) of stored images, e.g. from an earlier answer.",
            annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False),
        )
        async def draw_image(
            prompt: Annotated[str, Field(description="what to draw", min_length=1, max_length=2000)],
            ctx: Context,
            kind: Annotated[
                Literal["generate", "edit", "continue"], Field(description="generate, edit or continue")
            ] = "generate",
            references: Annotated[
                list[str] | None, Field(description="ids of stored images to keep consistent with", max_length=16)
            ] = None,
            seed: Annotated[int, Field(description="seed", ge=0)] = 0,
        ) -> CallToolResult:
            def body(emit: Callable[[float, float | None, str], None]) -> Any:
                return app.draw(prompt, kind, list(references or []), seed, emit)

            return await app.call(ctx, body)

        return server


def _server_class() -> Any:
    """``MCPServer`` whose argument errors are one line (``prompt: String should have at least 1
    character``), not pydantic's whole report with its links."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from pydantic import ValidationError

    from duogen_agents.validation import validation_line

    class Server(MCPServer):
        async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
            try:
                return await super().call_tool(name, arguments, context)
            except ToolError as e:
                if not isinstance(e.__cause__, ValidationError):
                    raise
                raise ToolError(
                    f"Error executing tool {name}: {validation_line(e.__cause__.errors())}"
                ) from e.__cause__

    return Server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("duogen-agents")
    except PackageNotFoundError:  # pragma: no cover
        return "0"


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send whatever writes to fd 1 to stderr (stdio: the protocol owns stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _transport_security(host: str) -> Any:
    """DNS-rebinding protection on loopback (the SDK's own for the usual names, extended to any
    loopback address); none elsewhere, where the bearer token guards every request."""
    if not is_loopback(host):
        return None
    from mcp.server.transport_security import TransportSecuritySettings

    shown = f"[{host.strip('[]')}]" if ":" in host else host
    hosts = {f"{shown}:*", "127.0.0.1:*", "localhost:*", "[::1]:*"}
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=sorted(hosts),
        allowed_origins=sorted(f"http://{h}" for h in hosts),
    )


def http_app(server: Any, *, host: str, tokens: tuple[str, ...]) -> Any:
    """The SDK's Streamable HTTP app at ``/mcp``, behind the bearer check when there are tokens."""
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH, host=host, transport_security=_transport_security(host)
    )
    return BearerAuth(app, tokens) if tokens else app


def serve(
    *,
    preset: str | Path,
    transport: str = "stdio",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    db: str | None = None,
    home: Path | None = None,
    wait: float | None = None,
) -> int:
    """Load the preset and serve until the client disconnects (stdio) or Ctrl-C (HTTP)."""
    if transport not in ("stdio", "http"):
        raise ConfigError(f"unknown transport {transport!r}; use stdio or http")
    tokens = api_keys()
    if transport == "http":
        check_binding(host, tokens)
        if not 0 <= port < 65536:
            raise ConfigError(f"invalid port {port}: use 1-65535 (0: any free port)")
    _require_sdk()
    from duogen_agents.presets import load_preset
    from duogen_agents.sessions import Sessions

    spec = load_preset(preset)
    sessions = Sessions.open(db, home=home)
    try:
        print(
            f"duogen mcp: loading preset {spec.name}"
            + (" (random weights: its words and pictures are noise)" if spec.is_tiny else "")
            + "...",
            file=sys.stderr,
            flush=True,
        )
        from duogen_agents.agent import Agent

        with _stdout_to_stderr() if transport == "stdio" else contextlib.nullcontext():
            agent = Agent.from_preset(spec, home=home)
        server = DuogenMCP(agent, sessions, wait=wait, where=str(sessions.store.root)).build()
        try:
            if transport == "stdio":
                import anyio

                print("duogen mcp: serving on stdio", file=sys.stderr, flush=True)
                anyio.run(server.run_stdio_async)
            else:
                _serve_http(server, host, port, tokens)
        except KeyboardInterrupt:
            print("duogen mcp: stopped", file=sys.stderr)
        return 0
    finally:
        sessions.close()


def _listen(host: str, port: int) -> Any:
    """A socket bound to ``host:port`` (port 0: one the system picks), or a one-line ``ConfigError``."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve host {host!r}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections wait in the backlog until the server starts
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _serve_http(server: Any, host: str, port: int, tokens: tuple[str, ...]) -> None:
    import uvicorn

    app = http_app(server, host=host, tokens=tokens)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    auth = f"bearer token from ${API_KEY_ENV}" if tokens else "no token (loopback only)"
    print(f"duogen mcp: serving on http://{shown}:{bound}{MCP_PATH} ({auth})", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=bound, log_level="warning", lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["API_KEY_ENV", "BearerAuth", "DuogenMCP", "check_binding", "http_app", "is_loopback", "serve"]
