"""The package imports light: torch, transformers and diffusers load when a preset's models are built,
never on ``import duogen_agents``, and never for session commands that need no model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.security.helpers import make_session

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "diffusers", "xgrammar")


def _python(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_duogen_agents_is_light() -> None:
    out = _python(
        f"""
        import sys, duogen_agents
        from duogen_agents import Agent, InterleavedDocument, Session, Sessions, build_graph
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_session_commands_load_no_model_library(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'duogen.db'}"
    make_session(url, tmp_path, "garden")
    out = _python(
        f"""
        import sys
        from duogen_agents.cli import main
        db = ["--db", {url!r}, "--home", {str(tmp_path)!r}]
        codes = [
            main(["sessions", "list", *db]),
            main(["sessions", "show", "garden", *db]),
            main(["sessions", "export", "garden", "--format", "html", "--out", {str(tmp_path / "g.html")!r}, *db]),
            main(["sessions", "fork", "garden", "--as", "copy", *db]),
            main(["sessions", "delete", "copy", *db]),
            main(["sessions", "gc", *db]),
        ]
        print("CODES", codes, "HEAVY", sorted(m for m in {HEAVY!r} if m in sys.modules))
        """
    )
    assert "CODES [0, 0, 0, 0, 0, 0] HEAVY []" in out, out
