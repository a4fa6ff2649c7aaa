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
        (("sessions", "show", "ghost"), "no session 'ghost'"),
        (("sessions", "list", "--db", "mysql://u@h/d"), "unsupported database"),
    ]:
        code, out, err = _run(capsys, *argv)
        assert code == 1, (argv, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, (argv, err)
    assert bad.read_bytes() == b"not a database" * 100
