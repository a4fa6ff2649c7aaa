"""``duogen mcp``: the agent's tools over MCP (stdio and Streamable HTTP) through the official ``mcp``
client SDK, on the real tiny preset in a subprocess; the bearer token; the refused public bind."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="duogen mcp needs the mcp 2 SDK (the serve extra)")

from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from duogen_agents.errors import ConfigError  # noqa: E402
from duogen_agents.serve import mcp as duogen_mcp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOLS = {"visual_plan", "answer_with_images", "continue_session", "finish_turn", "list_sessions", "draw_image"}
START_TIMEOUT_S = 120
TEST_TIMEOUT_S = 240
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _server_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        "DUOGEN_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "duogen_agents.cli", "mcp", "--preset", "tiny", *argv]


def _check_png_images(result: Any) -> list[bytes]:
    """The result's image contents: PNGs that decode."""
    from PIL import Image

    pngs = []
    for block in result.content:
        if block.type == "image":
            assert block.mime_type == "image/png"
            data = base64.b64decode(block.data, validate=True)
            assert data.startswith(PNG_MAGIC)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                assert im.width > 0 and im.height > 0
            pngs.append(data)
    return pngs


async def _exercise(client: Client) -> None:
    """What both transports must do: list the tools, plan with progress (the server answers
    another call meanwhile), list the session, continue it, draw from one of its images, and report errors."""
    tools = await client.list_tools()
    assert {t.name for t in tools.tools} == TOOLS
    schema = {t.name: t.input_schema for t in tools.tools}
    assert "prompt" in schema["visual_plan"]["required"]
    assert set(schema["continue_session"]["required"]) == {"session_id", "prompt"}

    progress: list[tuple[float, float | None, str | None]] = []
    turn_running = anyio.Event()
    answered_during_turn: list[bool] = []
    done = anyio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))
        turn_running.set()

    async def call_while_the_turn_runs() -> None:
        await turn_running.wait()
        # The event loop is free while the models run in a worker thread: another call is answered.
        listed = await client.call_tool("list_sessions", {})
        assert not listed.is_error, listed.content
        answered_during_turn.append(not done.is_set())

    results: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(call_while_the_turn_runs)
        results.append(
            await client.call_tool(
                "visual_plan",
                {"prompt": "Plan a small balcony garden", "session_id": "balcony"},
                progress_callback=on_progress,
            )
        )
        done.set()
        if not turn_running.is_set():  # no progress came: the assertion below says so
            tg.cancel_scope.cancel()
    plan = results[0]
    assert not plan.is_error, plan.content
    assert answered_during_turn == [True]
    header = plan.content[0].text
    assert "session: balcony" in header and "document: balcony#1" in header
    data = plan.structured_content
    assert data["session_id"] == "balcony" and data["document_id"] == "balcony#1" and data["mode"] == "visual-plan"
    # A visual plan has steps and images (noise from random weights, but structurally valid).
    assert data["title"] is not None and data["images"]
    assert all(img["step"] is not None for img in data["images"])
    pngs = _check_png_images(plan)
    assert len(pngs) == len(data["images"])
    assert any(b.type == "text" and b.text.strip() for b in plan.content[1:])
    values = [v for v, _, _ in progress]
    assert values and values == sorted(values) and len(set(values)) == len(values), progress
    assert any("step" in (m or "") for _, _, m in progress)

    listed = await client.call_tool("list_sessions", {})
    assert not listed.is_error and "balcony" in listed.content[0].text
    (info,) = [s for s in listed.structured_content["sessions"] if s["id"] == "balcony"]
    assert info["turns"] == 1 and info["mode"] == "visual-plan"

    follow = await client.call_tool("continue_session", {"session_id": "balcony", "prompt": "Redraw step 2 in blue"})
    assert not follow.is_error, follow.content
    assert follow.structured_content["document_id"] == "balcony#2"
    assert follow.structured_content["mode"] == "visual-plan"  # the session's mode
    _check_png_images(follow)
    listed = await client.call_tool("list_sessions", {})
    (info,) = [s for s in listed.structured_content["sessions"] if s["id"] == "balcony"]
    assert info["turns"] == 2

    ref = data["images"][0]["short_id"]
    drawn = await client.call_tool("draw_image", {"prompt": "the same pot, blue", "kind": "edit", "references": [ref]})
    assert not drawn.is_error, drawn.content
    assert drawn.structured_content["references"] == [data["images"][0]["id"]]
    assert len(_check_png_images(drawn)) == 1

    # Errors: a tool error with the one line of the DuogenError, never a traceback.
    for name, args, match in [
        ("continue_session", {"session_id": "ghost", "prompt": "hi"}, "no session 'ghost'"),
        ("visual_plan", {"prompt": "hi", "session_id": "bad id!"}, "invalid session id"),
        ("draw_image", {"prompt": "cat", "references": ["0123456789ab"]}, "names no earlier image"),
        # arguments the tool's schema refuses: one line too, not pydantic's report
        ("visual_plan", {"prompt": ""}, "visual_plan: prompt: String should have at least 1 character"),
        ("draw_image", {"prompt": "cat", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ("answer_with_images", {"prompt": "hi", "mode": "poem"}, "mode: Input should be"),
    ]:
        bad = await client.call_tool(name, args)
        assert bad.is_error, (name, bad)
        text = bad.content[0].text
        assert match in text and "\n" not in text and "Traceback" not in text, text


@pytest.mark.slow
async def test_stdio_lists_tools_plans_and_continues(home: Path, tmp_path: Path) -> None:
    params = StdioServerParameters(command=_command()[0], args=_command()[1:], env=_server_env(home), cwd=str(REPO))
    errlog = tmp_path / "server.err"
    with errlog.open("w") as err, anyio.fail_after(TEST_TIMEOUT_S):
        try:
            async with Client(stdio_client(params, errlog=err)) as client:
                await _exercise(client)
        except BaseException:
            err.flush()
            print(errlog.read_text()[-4000:], file=sys.stderr)
            raise
    log = errlog.read_text()
    assert "serving on stdio" in log and "Traceback" not in log, log


class _HttpServer:
    """``duogen mcp --transport http --port 0`` in a subprocess; ``url`` from its first lines."""

    def __init__(self, home: Path, **env: str) -> None:
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            _command("--transport", "http", "--port", "0"),
            env={**os.environ, **_server_env(home, **env)},
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # drained to the end, so the server never blocks on a full pipe
            self.lines.append(line)
            if self.url is None and (m := re.search(r"serving on (http://\S+)", line)):
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> str:
        assert self._ready.wait(START_TIMEOUT_S), "the server did not start in time"
        assert self.url is not None, "".join(self.lines)
        return self.url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def http_server(home: Path) -> Iterator[_HttpServer]:
    server = _HttpServer(home, DUOGEN_API_KEY="test-key-1,test-key-2")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
async def test_streamable_http_with_a_bearer_token(http_server: _HttpServer) -> None:
    import httpx2

    url = await anyio.to_thread.run_sync(http_server.wait_ready)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp")
    with anyio.fail_after(TEST_TIMEOUT_S):
        hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with httpx2.AsyncClient(timeout=30) as plain:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic test-key-1"}):
                r = await plain.post(url, json=hello, headers=headers)
                assert r.status_code == 401, (headers, r.status_code, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer")
        timeout = httpx2.Timeout(30, read=TEST_TIMEOUT_S)
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer test-key-2"}, timeout=timeout) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                await _exercise(client)
        # A client of the handshake era (initialize) works too.
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer test-key-1"}, timeout=timeout) as http:
            async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                result = await client.call_tool("answer_with_images", {"prompt": "Show a terracotta pot"})
                assert not result.is_error, result.content
                assert result.structured_content["mode"] == "interleaved"
                assert re.fullmatch(r"[0-9a-f]{8}#1", result.structured_content["document_id"])
    assert http_server.proc.poll() is None, "".join(http_server.lines)
    assert "Traceback" not in "".join(http_server.lines)


def test_public_host_without_a_token_is_refused(home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DUOGEN_API_KEY"}
    proc = subprocess.run(
        _command("--transport", "http", "--host", "0.0.0.0", "--port", "0"),
        env={**env, **_server_env(home)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("duogen: error: refusing to serve MCP on 0.0.0.0"), proc.stderr
    assert "DUOGEN_API_KEY" in lines[0]
    assert "loading preset" not in proc.stderr  # refused before any model loads


def test_binding_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert duogen_mcp.is_loopback(host), host
        duogen_mcp.check_binding(host, ())
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert not duogen_mcp.is_loopback(host), host
        with pytest.raises(ConfigError, match="DUOGEN_API_KEY"):
            duogen_mcp.check_binding(host, ())
        duogen_mcp.check_binding(host, ("k",))
    monkeypatch.setenv("DUOGEN_API_KEY", " a , ,b ")
    assert duogen_mcp.api_keys() == ("a", "b")
    monkeypatch.setenv("DUOGEN_API_KEY", "  ")
    assert duogen_mcp.api_keys() == ()


async def test_bearer_middleware() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    guarded = duogen_mcp.BearerAuth(app, ("s3cret",))

    async def status(headers: list[tuple[bytes, bytes]]) -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await guarded({"type": "http", "headers": headers}, None, send)
        return sent[0]["status"]

    assert await status([]) == 401
    assert await status([(b"authorization", b"Bearer s3cre")]) == 401
    assert await status([(b"authorization", b"Bearer s3cret!")]) == 401
    assert await status([(b"authorization", b"Token s3cret")]) == 401
    assert await status([(b"authorization", b"Bearer s3cret")]) == 200
    assert await status([(b"Authorization", b"bearer s3cret")]) == 200
    await guarded({"type": "lifespan"}, None, None)  # lifespan passes through without a token
    assert seen == ["http", "http", "lifespan"]


def test_missing_sdk_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mcp", None)  # import mcp -> ImportError
    with pytest.raises(ConfigError, match=re.escape("pip install 'duogen-agents[serve]'")):
        duogen_mcp._require_sdk()


async def test_a_progress_notification_nobody_reads_never_holds_the_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over streamable HTTP, a call cancelled (or whose client left) while it sent progress held its
    turn for good: the worker thread waited on a notification nobody would read, the session stayed
    busy, and the server ignored SIGTERM. Now a notification that cannot go out is dropped, and so are
    the ones after it; the turn goes on to its end."""
    import time

    monkeypatch.setattr(duogen_mcp, "PROGRESS_TIMEOUT_S", 0.3)
    sent: list[float] = []

    class StuckContext:
        async def report_progress(self, progress: float, total: float | None, message: str) -> None:
            sent.append(progress)
            await anyio.sleep_forever()  # a stream nobody reads any more

    def body(emit: Any) -> str:
        for step in range(5):
            emit(step, 5, f"step {step}")
        return "finished"

    server = duogen_mcp.DuogenMCP(agent=None, sessions=None, where="test")
    started = time.monotonic()
    with anyio.fail_after(10):
        assert await server.call(StuckContext(), body) == "finished"
    assert sent == [0] and time.monotonic() - started < 5  # one try, then no more

    class CancelledContext:  # the call's task cancelled: its cancellation came back into the turn's thread
        async def report_progress(self, progress: float, total: float | None, message: str) -> None:
            sent.append(progress)
            raise anyio.get_cancelled_exc_class()()

    sent.clear()
    with anyio.fail_after(10):
        assert await server.call(CancelledContext(), body) == "finished"  # it ended the turn mid-way
    assert sent == [0]


def test_finish_turn_resumes_or_drops_a_turn_cut_short(tmp_path: Path) -> None:
    """A client that left mid-turn (a stdio client quitting takes its server along) left the session
    with an unfinished turn that every MCP tool refused, pointing at `duogen run` and HTTP: an
    MCP-only user was stuck for good. ``finish_turn`` resumes it to its answer, or drops it."""
    from duogen_agents import Agent
    from duogen_agents.errors import SessionStateError
    from duogen_agents.presets import load_preset
    from duogen_agents.sessions import Sessions
    from tests.fakes import FailingImageTool, ScriptedPlanner

    pot = {"type": "image", "prompt": "a pot", "references": [], "kind": "generate"}
    script = [pot, {"verdict": "ok"}, {"type": "done"}, pot]
    agent = Agent(load_preset("tiny"), planner=ScriptedPlanner(script), image_tool=FailingImageTool(1), home=tmp_path)
    sessions = Sessions.open(f"sqlite:///{tmp_path / 'mcp.db'}", home=tmp_path)
    app = duogen_mcp.DuogenMCP(agent, sessions, where="test")
    events: list[dict[str, Any]] = []
    with pytest.raises(RuntimeError):
        app.turn("draw a pot", "s", "interleaved", None, events.append)
    with pytest.raises(SessionStateError, match="finish_turn resumes it or drops it"):
        app.turn("and a hat", "s", None, None, events.append)
    resumed = app.finish("s", "resume", events.append)
    assert resumed.structured_content["session_id"] == "s" and not resumed.is_error
    assert [t.status for t in sessions.turns("s")] == ["complete"]
    agent.image_tool.calls, agent.image_tool.fail_on = 0, 1  # the next drawing fails again
    with pytest.raises(RuntimeError):
        app.turn("and a hat", "s", None, None, events.append)
    dropped = app.finish("s", "discard", events.append)
    assert dropped.structured_content == {"session_id": "s", "dropped": True}
    assert [t.status for t in sessions.turns("s")] == ["complete", "cancelled"]
    with pytest.raises(SessionStateError, match="nothing to drop"):
        app.finish("s", "discard", events.append)
    sessions.close()


def test_a_busy_session_reads_as_a_server_says_it() -> None:
    """A busy session's error over MCP gave the CLI's advice (``--wait``) and the writer's pid, where
    ``duogen serve`` words it for its clients."""
    from duogen_agents.errors import SessionBusyError

    error = SessionBusyError("session 's' is busy: another turn is writing it (pid 30177); wait for it (--wait, ...)")
    error.session_id = "s"  # as Database.lock raises it
    line = duogen_mcp._one_line(error, "test")
    assert line == "session 's' is busy: another turn is writing it; try again when it finishes"


def test_an_unknown_session_reads_as_an_mcp_client_needs_it(tmp_path: Path) -> None:
    """A session gone between a tool's check and its read (deleted by another process) reached the
    client with the CLI's advice (`duogen sessions list`); the client is told the tool that lists them."""
    from duogen_agents.errors import SessionNotFoundError
    from duogen_agents.sessions import Sessions

    sessions = Sessions.open(f"sqlite:///{tmp_path / 'd.db'}", home=tmp_path)
    try:
        with pytest.raises(SessionNotFoundError) as caught:
            sessions.turns("ghost")  # what a turn's result reads back, after it checked the session exists
        assert "`duogen sessions list`" in str(caught.value)  # the CLI's line
    finally:
        sessions.close()
    assert duogen_mcp._one_line(caught.value, "test") == "no session 'ghost'; list_sessions shows the sessions"
