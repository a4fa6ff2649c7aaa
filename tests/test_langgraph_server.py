"""``langgraph dev`` serves the graph from the repository's ``langgraph.json``, driven by langgraph-sdk:
two concurrent runs on one loaded preset, then a follow-up on one thread; the server runs as the README
says, without ``--allow-blocking`` (its models load off the event loop), and serves only its presets."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(home):
    exe = shutil.which("langgraph")
    if exe is None:
        pytest.fail("langgraph-cli[inmem] is part of the dev extra: pip install -e '.[dev]'")
    port = _free_port()
    proc = subprocess.Popen(
        [
            exe,
            "dev",
            "--port",
            str(port),
            "--no-browser",
            "--no-reload",
            "--config",
            "langgraph.json",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "DUOGEN_HOME": str(home),
            "DUOGEN_PRESET": "tiny",
            "DUOGEN_PRESETS": "tiny,tiny-flux2",
            "PYTHONPATH": str(ROOT),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone (a failed start): its own error stands
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_langgraph_dev_serves_concurrent_runs_and_a_follow_up(server) -> None:
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    (assistant,) = [a for a in client.assistants.search() if a["graph_id"] == "duogen"]
    schemas = client.assistants.get_schemas(assistant["assistant_id"])
    assert set(schemas["input_schema"]["properties"]) == {"messages", "mode", "seed"}
    assert set(schemas["output_schema"]["properties"]) == {"messages", "blocks", "title", "stop_reason"}

    threads = [client.threads.create()["thread_id"] for _ in range(2)]
    requests = [("Plan a picnic", "visual-plan"), ("Draw a garden", "interleaved")]

    def run(i: int) -> dict:
        prompt, mode = requests[i]
        return client.runs.wait(
            threads[i], "duogen", input={"messages": [{"role": "user", "content": prompt}], "mode": mode, "seed": i}
        )

    with ThreadPoolExecutor(2) as pool:
        first = list(pool.map(run, range(2)))
    for out in first:
        assert out["stop_reason"] and out["messages"][0]["content"]
    assert any(b["type"] == "image" for b in first[0]["blocks"])

    follow = client.runs.wait(
        threads[0], "duogen", input={"messages": [{"role": "user", "content": "Now add a blanket"}], "seed": 5}
    )
    contents = [m["content"] for m in follow["messages"]]
    assert contents[0] == "Plan a picnic" and "Now add a blanket" in contents  # the thread's history carried on
    assert follow["stop_reason"]

    # A run chooses its preset in its context.
    other = client.runs.wait(
        client.threads.create()["thread_id"], "duogen", context={"preset": "tiny-flux2"},
        input={"messages": [{"role": "user", "content": "Draw a pot"}], "mode": "visual-plan", "seed": 1},
    )  # fmt: skip
    families = {b["family"] for b in other["blocks"] if b["type"] == "image"}
    assert families == {"flux2-klein"}
    # Only the presets the operator serves: anything else loads nothing and says so.
    refused = client.runs.wait(
        client.threads.create()["thread_id"], "duogen", context={"preset": "tiny-qwen3"},
        input={"messages": [{"role": "user", "content": "Draw a pot"}]}, raise_error=False,
    )  # fmt: skip
    assert refused["__error__"]["error"] == "ConfigError"


def test_a_run_chooses_only_among_the_served_presets(monkeypatch) -> None:
    from duogen_agents.errors import ConfigError
    from duogen_agents.graphs.server import chosen_preset

    monkeypatch.delenv("DUOGEN_PRESETS", raising=False)
    monkeypatch.setenv("DUOGEN_PRESET", "tiny")
    assert chosen_preset({}) == "tiny" and chosen_preset({"context": {"preset": "tiny"}}) == "tiny"
    for asked in ("tiny-flux2", "/etc/passwd.toml", "qwen2.5-vl-7b+cosmos2-2b", 7):
        with pytest.raises(ConfigError, match="is not served here; this server serves: tiny"):
            chosen_preset({"configurable": {"preset": asked}})
    monkeypatch.setenv("DUOGEN_PRESETS", "tiny, tiny-flux2")
    assert chosen_preset({"context": {"preset": "tiny-flux2"}}) == "tiny-flux2"
    assert chosen_preset({"configurable": {"preset": "tiny-flux2"}, "context": {"preset": "tiny"}}) == "tiny"
    # Only DUOGEN_PRESETS: a run that names none gets its first (it was refused: 'tiny' is not served).
    monkeypatch.delenv("DUOGEN_PRESET")
    monkeypatch.setenv("DUOGEN_PRESETS", "tiny-flux2,tiny-qwen3")
    assert chosen_preset({}) == "tiny-flux2" and chosen_preset({"context": {"preset": "tiny-qwen3"}}) == "tiny-qwen3"
    with pytest.raises(ConfigError, match="this server serves: tiny-flux2, tiny-qwen3"):
        chosen_preset({"context": {"preset": "tiny"}})
    # DUOGEN_PRESET outside DUOGEN_PRESETS is served too (it is the operator's default).
    monkeypatch.setenv("DUOGEN_PRESET", "tiny")
    assert chosen_preset({}) == "tiny" and chosen_preset({"context": {"preset": "tiny-qwen3"}}) == "tiny-qwen3"


def test_a_preset_loading_holds_only_its_own_runs(monkeypatch) -> None:
    """While one preset loads (minutes for a real one), runs of an already loaded preset get their
    graph at once (a test double stands in for the loading)."""
    import threading

    from duogen_agents.agent import Agent
    from duogen_agents.graphs import server

    monkeypatch.setattr(server, "_agents", {"ready": "the loaded agent"})
    monkeypatch.setattr(server, "_loading", {})
    started, finish = threading.Event(), threading.Event()
    loads: list[str] = []

    def slow_load(preset, **kwargs):
        loads.append(preset)
        started.set()
        assert finish.wait(30)
        return f"agent of {preset}"

    monkeypatch.setattr(Agent, "from_preset", staticmethod(slow_load))
    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(server.agent_for("slow")))
    second = threading.Thread(target=lambda: results.append(server.agent_for("slow")))
    first.start()
    assert started.wait(30)
    second.start()
    assert server.agent_for("ready") == "the loaded agent"  # not held by the load in progress
    finish.set()
    first.join(30)
    second.join(30)
    assert results == ["agent of slow", "agent of slow"] and loads == ["slow"]  # loaded once


def test_the_served_graph_reads_no_file_of_the_server_and_names_none(tmp_path, monkeypatch) -> None:
    """The LangGraph server's graph read ``file://`` image URLs from its clients' messages: any image
    file on the server's disk went into the store and back to the client as a ``file_id`` (and the
    error told files that exist from files that do not), and its ``custom`` stream sent each picture's
    path on the server. Now such a URL is refused, pixels (base64, ``data:``) are taken, and events
    name no path. A library user's own graph still reads local files."""
    import base64
    import io

    from PIL import Image

    from duogen_agents.agent import Agent
    from duogen_agents.errors import ConfigError, InputImageError
    from duogen_agents.graphs import server
    from duogen_agents.graphs.turn import build_graph
    from duogen_agents.presets import load_preset
    from tests.fakes import ScriptedPlanner, SolidImageTool

    draw = {"type": "image", "prompt": "a pot", "references": [], "kind": "generate"}
    script = [draw, {"verdict": "ok"}, {"type": "done"}] * 3
    agent = Agent(load_preset("tiny"), planner=ScriptedPlanner(script), image_tool=SolidImageTool(), home=tmp_path)
    monkeypatch.setattr(server, "_agents", {"tiny": agent})
    monkeypatch.setenv("DUOGEN_PRESET", "tiny")
    monkeypatch.delenv("DUOGEN_PRESETS", raising=False)
    graph = server._graph({})
    secret = tmp_path / "secret.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(secret)

    def ask(url: str) -> dict:
        image = {"type": "image", "url": url}
        return {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "describe it"}]}]}

    for url in (f"file://{secret}", "file:///etc/passwd", "file:///no/such/file.png"):
        with pytest.raises(InputImageError, match="refusing a file:// image URL"):
            graph.invoke(ask(url))
    for file_id in ("", "0123456789ab"):  # a block that names a file_id too is never read as its url
        sneaky = {"type": "image", "file_id": file_id, "url": f"file://{secret}"}
        with pytest.raises(ConfigError, match="not a duogen image id"):
            graph.invoke({"messages": [{"role": "user", "content": [sneaky, {"type": "text", "text": "hi"}]}]})
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="PNG")
    events = [e for _, e in graph.stream(ask("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()),
                                         stream_mode=["custom", "values"]) if "event" in e]  # fmt: skip
    ready = [e for e in events if e["event"] == "image_ready"]
    assert ready and all("path" not in e for e in ready)
    assert str(tmp_path) not in repr(events)

    own = build_graph(agent.deps)  # the library's own graph: a local file is the caller's own
    out = own.invoke(ask(f"file://{secret}"), {"configurable": {"thread_id": "t"}})
    assert out["messages"][0].content[0]["type"] == "image" and "file_id" in out["messages"][0].content[0]
