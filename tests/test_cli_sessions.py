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
