"""Real processes: SIGKILL in the middle of rendering then resume; busy writers; parallel sessions."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from duogen_agents.sessions import Sessions
from duogen_agents.storage.database import Database
from duogen_agents.storage.images import ImageStore

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import sys, time
    from duogen_agents import Agent

    agent = Agent.from_preset("tiny")
    tool = agent.image_tool
    draw, calls = tool.draw, []

    def slow_second_draw(prompt, **kw):
        calls.append(prompt)
        inner = kw.get("on_step")
        if len(calls) == 2:
            def on_step(step, total):
                if inner:
                    inner(step, total)
                print("RENDERING", flush=True)
                time.sleep(600)  # the parent kills us here, mid-denoise
            kw["on_step"] = on_step
        return draw(prompt, **kw)

    tool.draw = slow_second_draw
    session = agent.session("crash", database=sys.argv[1])
    for _ in session.stream("Plan a picnic in the park", mode="visual-plan", seed=3):
        pass
    print("FINISHED", flush=True)
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_sigkill_mid_render_then_resume(db_url, home, tmp_path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), db_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.strip() in ("RENDERING", "FINISHED") or not line:
                break
        assert line.strip() == "RENDERING", proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    store = ImageStore(home)
    with Database.open(db_url, home=home) as db:
        sessions = Sessions(db, store)
        (turn,) = sessions.turns("crash")
        assert turn.status == "running"  # killed: no chance to record anything else
        before = {i for i, _ in store.iter_files() if i}
        assert len(before) >= 1  # the first image was drawn and checkpointed

    cli = [sys.executable, "-m", "duogen_agents.cli", "run", "--session", "crash", "--db", db_url]
    done = subprocess.run([*cli, "--resume"], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr

    with Database.open(db_url, home=home) as db:
        sessions = Sessions(db, store)
        (turn,) = sessions.turns("crash")
        assert turn.status == "complete"
        doc = turn.document
        steps = [b for b in doc.blocks if b.type == "text"]
        assert len(steps) >= 2 and len(doc.images) == len(steps)  # every step has exactly one image
        assert [b.step for b in doc.images] == list(range(len(steps)))
        arts = sessions.image_artifacts("crash")
        shas = [a["sha256"] for a in arts]
        assert len(shas) == len(set(shas))
        assert before <= set(shas)  # the image drawn before the kill was kept, not drawn again
        files = {i for i, _ in store.iter_files()}
        assert files == set(shas)  # no orphan files, no temporary leftovers
        if db.backend == "sqlite":
            assert db.path is not None
            with sqlite3.connect(db.path) as c:
                assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    again = subprocess.run([*cli, "--resume"], capture_output=True, text=True, env=_env(), timeout=120)
    assert again.returncode == 0 and "nothing to resume" in again.stderr


def test_second_process_on_a_busy_session_gets_a_clear_error(db_url, home) -> None:
    with Database.open(db_url, home=home) as db, db.lock("shared"):
        cli = [sys.executable, "-m", "duogen_agents.cli", "run", "--session", "shared", "--db", db_url, "hello"]
        r = subprocess.run(cli, capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 1
        assert r.stderr.startswith("duogen: error: session 'shared' is busy") and r.stderr.count("\n") == 1
        t0 = time.monotonic()
        r = subprocess.run([*cli, "--wait", "1"], capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 1 and "busy" in r.stderr and time.monotonic() - t0 >= 1


PARALLEL_CHILD = textwrap.dedent(
    """
    import sys
    from duogen_agents import Agent
    from duogen_agents.presets import load_preset
    from tests.fakes import ScriptedPlanner, SolidImageTool

    url, sid, home = sys.argv[1:4]
    done = {"type": "done"}
    script = [{"type": "text", "text": sid}, {"type": "image", "prompt": sid, "references": [], "kind": "generate"},
              {"verdict": "ok"}, done, {"type": "text", "text": sid + " again"}, done]
    agent = Agent(load_preset("tiny"), planner=ScriptedPlanner(script), image_tool=SolidImageTool(), home=home)
    session = agent.session(sid, database=url)
    session.send("first " + sid)
    session.send("second " + sid)
    print("OK", sid)
    """
)


def test_several_sessions_at_once_from_several_processes(db_url, tmp_path) -> None:
    script = tmp_path / "parallel.py"
    script.write_text(PARALLEL_CHILD)
    Database.open(db_url, home=tmp_path).close()  # one migration up front; children race on the rest
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), db_url, f"p{i}", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for i in range(4)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    with Database.open(db_url, home=tmp_path) as db:
        sessions = Sessions(db, ImageStore(tmp_path))
        assert sorted(s.id for s in sessions.list()) == ["p0", "p1", "p2", "p3"]
        for i in range(4):
            turns = sessions.turns(f"p{i}")
            assert [t.status for t in turns] == ["complete", "complete"]
            assert turns[1].document.text == f"p{i} again"
