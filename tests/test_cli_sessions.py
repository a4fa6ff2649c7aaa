"""``duogen run --session`` and ``duogen sessions ...`` with the real tiny preset (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest

from duogen_agents.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.slow
def test_session_commands_end_to_end(db_url, home, tmp_path, capsys) -> None:
    db = ("--db", db_url)
    code, out, err = _run(
        capsys, "run", "--session", "balcony", "Plan a small balcony garden", "--mode", "visual-plan", *db
    )
    assert code == 0, err
    code, out, err = _run(capsys, "run", "--session", "balcony", "Redraw step 2 with a blue pot", *db)
    assert code == 0, err
    assert "Image 1:" in out

    code, out, err = _run(capsys, "sessions", "list", *db)
    assert code == 0 and "balcony" in out and "visual-plan" in out
    code, out, err = _run(capsys, "sessions", "show", "balcony", *db)
    assert "#1 you: Plan a small balcony garden" in out and "#2 you: Redraw step 2 with a blue pot" in out
    assert out.count(".png") >= 4

    html = tmp_path / "balcony.html"
    code, out, err = _run(capsys, "sessions", "export", "balcony", "--format", "html", "--out", str(html), *db)
    assert code == 0 and html.read_text().count("data:image/png;base64,") >= 4
    code, out, err = _run(capsys, "sessions", "export", "balcony", "--format", "json", *db)
    doc = json.loads(out)
    you = [b["text"] for b in doc["blocks"] if b["type"] == "text" and b["text"].startswith("**You:**")]
    assert you == [
        "**You:** Plan a small balcony garden",
        "**You:** Redraw step 2 with a blue pot",
    ]
    assert sum(b["type"] == "image" for b in doc["blocks"]) >= 4

    code, out, err = _run(capsys, "sessions", "fork", "balcony", "--as", "balcony-2", *db)
    assert code == 0 and "balcony-2" in out
    code, out, err = _run(capsys, "run", "--session", "balcony", "--resume", *db)
    assert code == 0 and "nothing to resume" in err
    code, out, err = _run(capsys, "sessions", "delete", "balcony", *db)
    assert code == 0 and "0 image file(s)" in out  # the fork still uses them
    code, out, err = _run(capsys, "sessions", "delete", "balcony-2", *db)
    assert code == 0
    assert not list((home / "images").rglob("*.png"))
    code, out, err = _run(capsys, "sessions", "show", "balcony", *db)
    assert code == 1 and err.startswith("duogen: error: no session 'balcony'")


def test_session_errors_are_one_line(home, tmp_path, capsys) -> None:
    bad = tmp_path / "notes.db"
    bad.write_bytes(b"not a database" * 100)
    for argv, match in [
        (("run", "--resume", "x"), "--resume needs --session"),
        (("run", "--session", "bad id!", "hi"), "invalid session id"),
        (("run", "--session", "s", "hi", "--db", f"sqlite:///{bad}"), "not a usable SQLite database"),
        (("run", "--session", "ghost", "--resume"), "no session 'ghost'"),
        (("run", "--session", "s", "--resume", "--discard"), "--resume continues the interrupted turn and --discard"),
        (("sessions", "show", "ghost"), "no session 'ghost'"),
        (("sessions", "list", "--db", "mysql://u@h/d"), "unsupported database"),
    ]:
        code, out, err = _run(capsys, *argv)
        assert code == 1, (argv, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, (argv, err)
    assert bad.read_bytes() == b"not a database" * 100


def test_export_never_replaces_the_sessions_and_reads_well_everywhere(home, tmp_path, capsys, monkeypatch) -> None:
    """``sessions export --out`` naming the session database (or a file in the image store) is
    refused, and both are intact (it replaced the database, losing every session); Markdown image links
    hold a name with spaces; on a terminal the export carries no escape sequence from stored text."""
    from markdown_it import MarkdownIt

    prompt = "\x1b]0;pwned\x07\x1b[2Jdraw a pot"
    code, out, err = _run(capsys, "run", "--session", "esc", prompt, "--mode", "visual-plan", "--no-preview")
    assert code == 0, err
    db = home / "duogen.db"
    before = db.read_bytes()
    pictures = sorted((home / "images").rglob("*.png"))
    assert pictures
    for target in (db, db.with_name("duogen.db-wal"), pictures[0], home / "images" / "new.json"):
        code, out, err = _run(capsys, "sessions", "export", "esc", "--format", "json", "--out", str(target))
        assert code == 1 and ("session database" in err or "image store" in err), (target, err)
    assert db.read_bytes() == before and not (home / "images" / "new.json").exists()
    code, out, err = _run(capsys, "sessions", "show", "esc")
    assert code == 0 and "draw a pot" in out

    md = tmp_path / "my garden.md"
    assert _run(capsys, "sessions", "export", "esc", "--format", "md", "--out", str(md))[0] == 0
    html = MarkdownIt("commonmark").render(md.read_text())
    assert html.count("<img") == len(pictures) and "my%20garden.images/" in html

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    for fmt in ("md", "html"):
        code, out, err = _run(capsys, "sessions", "export", "esc", "--format", fmt)
        assert code == 0 and "draw a pot" in out and "\x1b" not in out and "\x07" not in out


def test_a_message_to_a_session_with_an_unfinished_turn_is_refused_before_the_models_load(
    home, tmp_path, capsys, monkeypatch
) -> None:
    """``duogen run --session S "..."`` on a session with an interrupted turn loaded the preset first
    (seconds with the tiny one, minutes with a 7B), then refused. Now it refuses at once, saying what
    to do; ``--discard`` still drops the turn and sends the message."""
    from duogen_agents import Agent
    from duogen_agents.presets import load_preset
    from duogen_agents.sessions import Sessions
    from tests.fakes import FailingImageTool, ScriptedPlanner

    url = f"sqlite:///{tmp_path / 'duogen.db'}"
    script = [{"type": "image", "prompt": "a pot", "references": [], "kind": "generate"}]
    agent = Agent(load_preset("tiny"), planner=ScriptedPlanner(script), image_tool=FailingImageTool(1), home=home)
    with pytest.raises(RuntimeError):
        agent.session("s", database=agent_db(url, home)).send("draw a pot")

    def no_load(*args, **kwargs):
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(Agent, "from_preset", no_load)
    code, out, err = _run(capsys, "run", "--session", "s", "something else", "--db", url)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "unfinished turn" in lines[-1] and "--resume" in lines[-1] and "--discard" in lines[-1]
    assert Sessions.open(url, home=home).last_turn("s").status == "interrupted"  # nothing changed


def agent_db(url, home):
    from duogen_agents.storage.database import Database

    return Database.open(url, home=home)


def test_sessions_list_piped_keeps_every_column(home, tmp_path, capsys) -> None:
    """Piped (80 columns), ``sessions list`` dropped whole columns: the id, or the state that says a
    turn is unfinished. Piped, rows are now whole; in a narrow terminal the least needed columns go."""
    from datetime import datetime

    from duogen_agents import Agent
    from duogen_agents.presets import load_preset
    from duogen_agents.sessions.repository import SessionInfo
    from duogen_agents.terminal.render import sessions_table
    from tests.fakes import FailingImageTool, ScriptedPlanner
    from tests.test_chat import _render

    url = f"sqlite:///{tmp_path / 'duogen.db'}"
    script = [{"type": "text", "text": "Water the pots."}, {"type": "image", "prompt": "a pot", "references": [],
              "kind": "generate"}]  # fmt: skip
    agent = Agent(load_preset("tiny"), planner=ScriptedPlanner(script), image_tool=FailingImageTool(1), home=home)
    name = "balcony-garden-for-the-summer-of-2026"
    with pytest.raises(RuntimeError):
        agent.session(name, database=agent_db(url, home)).send("Plan a balcony garden with tomatoes and herbs")
    code, out, err = _run(capsys, "sessions", "list", "--db", url)
    header, row = out.splitlines()[:2]
    assert header.split()[:7] == ["id", "turns", "images", "mode", "preset", "updated", "state"]
    assert row.startswith(name) and "unfinished turn" in row and "tiny" in row and len(row) > 80

    t = datetime(2026, 11, 26, 9, 30)
    info = SessionInfo(name, "Balcony garden", "qwen2.5-vl-7b+cosmos2-2b", "visual-plan", None, t, t, 2, 4,
                       "interrupted")  # fmt: skip
    for width in (60, 80, 100):  # a terminal: what fits, the id and the state always whole
        header, row = _render(sessions_table([info], width=width), width=width).splitlines()[:2]
        assert header.split()[0] == "id" and "state" in header.split(), (width, header)
        assert row.startswith(name) and "unfinished turn" in row, (width, row)
