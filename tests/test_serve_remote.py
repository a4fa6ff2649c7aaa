"""One ``duogen`` as another's remote planner and image model: a ``duogen serve --preset tiny`` process,
and ``duogen run`` processes whose preset points both backends at it (loopback only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_load import free_port  # noqa: E402

TOKEN = "remote-test-token"


def start(port: int, db: str, home: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "duogen_agents.cli", "serve", "--preset", "tiny", "--port", str(port), "--db", db,
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "DUOGEN_API_KEY": TOKEN, "DUOGEN_HOME": str(home)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, "duogen serve exited before it was ready"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("duogen serve was not ready in time")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_preset(path: Path, port: int) -> Path:
    url = f"http://127.0.0.1:{port}/v1"
    preset = {
        "name": "remote-tiny",
        "planner": {"backend": "openai", "base_url": url, "api_key_env": "DUOGEN_REMOTE_KEY", "max_retries": 0,
                    "timeout_s": 60, "temperature": 0.7, "max_text_chars": 200, "max_prompt_chars": 120,
                    "max_new_tokens": 2048},
        "image": {"backend": "openai-images", "base_url": url, "api_key_env": "DUOGEN_REMOTE_KEY", "max_retries": 0,
                  "timeout_s": 60, "width": 64, "height": 64, "kinds": ["generate", "edit", "continue"]},
        "limits": {"max_images": 4, "plan_max_steps": 4, "max_turn_tokens": 8192, "check": False},
    }  # fmt: skip
    path.write_text(json.dumps(preset))
    return path


def run_cli(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "DUOGEN_HOME": str(home), "DUOGEN_REMOTE_KEY": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "duogen_agents.cli", "run", *args], capture_output=True, text=True, env=env,
        timeout=timeout,
    )  # fmt: skip


def turns(db: str, home: Path, session: str) -> list[Any]:
    from duogen_agents.sessions import Sessions

    sessions = Sessions.open(db, home=home)
    try:
        return sessions.turns(session)
    finally:
        sessions.close()


@pytest.fixture
def served(home: Path, tmp_path: Path) -> Any:
    port = free_port()
    server_db = f"sqlite:///{tmp_path / 'server.db'}"
    proc = start(port, server_db, home)
    state = {"proc": proc, "port": port, "db": server_db}
    yield state
    stop(state["proc"])


def test_a_whole_visual_plan_and_a_two_turn_session_through_duogen_serve(
    served: Any, home: Path, tmp_path: Path
) -> None:
    preset = client_preset(tmp_path / "remote.json", served["port"])
    client_home = tmp_path / "client"
    client_home.mkdir()
    db = f"sqlite:///{tmp_path / 'client.db'}"
    out = tmp_path / "out"
    first = run_cli("Plan a picnic", "--preset", str(preset), "--mode", "visual-plan", "--session", "picnic",
                    "--db", db, "--out", str(out), "--no-preview", home=client_home)  # fmt: skip
    assert first.returncode == 0, first.stderr
    doc = json.loads((out / "document.json").read_text())
    assert doc["mode"] == "visual-plan" and [b for b in doc["blocks"] if b["type"] == "image"]
    second = run_cli("Now for a rainy day", "--preset", str(preset), "--session", "picnic", "--db", db,
                     "--no-preview", home=client_home)  # fmt: skip
    assert second.returncode == 0, second.stderr
    history = turns(db, client_home, "picnic")
    assert [t.status for t in history] == ["complete", "complete"]
    assert all(b.image.id for t in history for b in t.document.images)
    # the drawing happened on the server: its health counts the requests it served
    health = httpx.get(f"http://127.0.0.1:{served['port']}/health").json()["queues"]
    assert health["planner"]["served"] >= 4 and health["image"]["served"] >= 1
    # the client never loaded a model: no tiny checkpoints were built in its home
    assert not (client_home / "models").exists()


def test_server_killed_mid_turn_gives_a_clear_error_and_resume_works_once_it_is_back(
    served: Any, home: Path, tmp_path: Path
) -> None:
    port = served["port"]
    preset = client_preset(tmp_path / "remote.json", port)
    client_home = tmp_path / "client"
    client_home.mkdir()
    db = f"sqlite:///{tmp_path / 'client.db'}"
    env = {**os.environ, "DUOGEN_HOME": str(client_home), "DUOGEN_REMOTE_KEY": TOKEN}
    for attempt in range(3):  # the kill must land inside the turn; a turn that wins the race is tried again
        session = f"cut-{attempt}"
        client = subprocess.Popen(
            [sys.executable, "-m", "duogen_agents.cli", "run", "Plan a picnic", "--preset", str(preset), "--mode",
             "visual-plan", "--session", session, "--db", db, "--no-preview"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and client.poll() is None:  # wait for the first picture
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["queues"]["image"]["served"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        stop(served["proc"], signal.SIGKILL)
        _, stderr = client.communicate(timeout=300)
        if client.returncode != 0:
            break
        served["proc"] = start(port, served["db"], home)
    else:
        pytest.fail("three turns finished before the server could be killed")
    assert client.returncode == 1
    errors = [line for line in stderr.strip().splitlines() if "error" in line.lower()]  # progress bars aside
    assert len(errors) == 1 and errors[0].startswith("duogen: error:") and f"127.0.0.1:{port}" in errors[0], stderr
    assert "Traceback" not in stderr
    assert [t.status for t in turns(db, client_home, session)] == ["interrupted"]

    served["proc"] = start(port, served["db"], home)  # back on the same address
    resumed = run_cli("--preset", str(preset), "--session", session, "--db", db, "--resume", "--no-preview",
                      home=client_home)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    [turn] = turns(db, client_home, session)
    assert turn.status == "complete" and turn.document.images
