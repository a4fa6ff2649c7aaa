"""Shared set-up for the attack tests: real sessions written by the real graph (scripted planner)."""

from __future__ import annotations

from pathlib import Path

from duogen_agents import Agent
from duogen_agents.presets import load_preset
from duogen_agents.storage.database import Database
from tests.fakes import ScriptedPlanner, SolidImageTool

TEXT = {"type": "text", "text": "Water the pots in the morning."}
DONE = {"type": "done"}
OK = {"verdict": "ok"}


def image(prompt: str, refs=(), kind: str = "generate") -> dict:
    return {"type": "image", "prompt": prompt, "references": list(refs), "kind": kind}


def scripted_agent(home: Path, script, tool=None) -> Agent:
    return Agent(
        load_preset("tiny"), planner=ScriptedPlanner(list(script)), image_tool=tool or SolidImageTool(), home=home
    )


def make_session(db_url: str, home: Path, session_id: str, script=None):
    """One finished turn with one image in ``session_id``; returns its document."""
    agent = scripted_agent(home, script or [TEXT, image("a terracotta pot"), OK, DONE])
    with Database.open(db_url, home=home) as db:
        return agent.session(session_id, database=db).send("Plan a small balcony garden")


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
