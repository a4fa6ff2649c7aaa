"""``langgraph dev`` serves the graph from the repository's ``langgraph.json``, driven by langgraph-sdk:
two concurrent runs on one loaded preset, then a follow-up on one thread."""

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
            "--allow-blocking",
            "--config",
            "langgraph.json",
        ],
        cwd=ROOT,
        env={**os.environ, "DUOGEN_HOME": str(home), "DUOGEN_PRESET": "tiny", "PYTHONPATH": str(ROOT)},
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
