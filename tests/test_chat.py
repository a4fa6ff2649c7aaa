"""``duogen chat``: renderers printed to a StringIO console, the piped mode, and the real chat in tmux."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from duogen_agents.sessions import SessionInfo
from duogen_agents.terminal.chat import piped_messages
from duogen_agents.terminal.events import partial_text
from duogen_agents.terminal.render import (
    HalfBlockImage,
    KittyImage,
    SixelImage,
    StepProgress,
    detect_image_mode,
    image_view,
    sessions_table,
)


def _render(renderable, width=80) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_progress_renders_bar_steps_and_time() -> None:
    p = StepProgress("image 2", total=8, started=0)
    p.update(3)
    p.elapsed = 4.2
    assert _render(p) == "image 2  ━━━━━━━━━                 3/8 steps  0:00:04\n"
    p.done()
    assert "8/8 steps" in _render(p) and "━" * 24 in _render(p)


def test_markdown_text_and_partial_json_text() -> None:
    from rich.markdown import Markdown

    assert _render(Markdown("**Water** the pots.")) == "Water the pots.".ljust(80) + "\n"
    assert partial_text('{"type": "text", "text": "Water the ') == "Water the "
    assert partial_text('{"type": "text", "text": "line\\nnext \\u00e') == "line\nnext "
    assert partial_text('{"type": "image", "prompt": "x"') == ""


def test_half_block_image_and_protocols() -> None:
    im = Image.new("RGB", (4, 4), (255, 0, 0))
    out = Console(file=io.StringIO(), width=20, color_system="truecolor")
    out.print(HalfBlockImage(im, max_width=4))
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert text.count("▀") == 8 and "38;2;255;0;0" in text
    assert KittyImage(im).escape(4).startswith("\x1b_Ga=T,f=100,c=4,m=0;")
    six = SixelImage(im).escape()
    assert six.startswith('\x1bPq"1;1;4;4') and six.endswith("\x1b\\") and "#0;2;100;0;0" in six
    assert image_view(im, "off") is None and isinstance(image_view(im, "halfcell"), HalfBlockImage)


def test_image_mode_detection() -> None:
    tty = Console(file=io.StringIO(), force_terminal=True)
    assert detect_image_mode(Console(file=io.StringIO()), {}) == "off"
    assert detect_image_mode(tty, {"TERM": "xterm-kitty"}) == "kitty"
    assert detect_image_mode(tty, {"TERM": "foot"}) == "sixel"
    assert detect_image_mode(tty, {"TERM": "xterm-256color"}) == "halfcell"
    assert detect_image_mode(tty, {"TERM": "xterm-kitty", "TMUX": "/tmp/x"}) == "halfcell"


def test_sessions_table(monkeypatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # stored times are UTC; the table shows local time
    time.tzset()
    try:
        _check_sessions_table()
    finally:
        monkeypatch.undo()
        time.tzset()


def _check_sessions_table() -> None:
    t = datetime(2026, 11, 26, 14, 30, tzinfo=timezone.utc)
    info = SessionInfo("balcony", "Balcony garden", "tiny", "visual-plan", None, t, t, 2, 4, "complete")
    lines = _render(sessions_table([info], current="balcony"), width=100).splitlines()
    assert lines[0].split() == ["id", "turns", "images", "mode", "preset", "updated", "state", "title"]
    assert lines[1].split() == [
        "*",
        "balcony",
        "2",
        "4",
        "visual-plan",
        "tiny",
        "2026-11-26",
        "09:30",
        "ok",
        "Balcony",
        "garden",
    ]


def test_piped_input_is_split_into_messages_and_commands() -> None:
    assert piped_messages("Plan a picnic\n") == ["Plan a picnic"]
    assert piped_messages("/mode draft\nline one\nline two\n\nsecond\n/quit\n") == [
        "/mode draft",
        "line one\nline two",
        "second",
        "/quit",
    ]
    # the interactive continuation marker, piped: dropped as it is when typed (it reached the planner)
    assert piped_messages("first line \\\nsecond line\n") == ["first line \nsecond line"]


def _duogen() -> list[str]:
    return [sys.executable, "-m", "duogen_agents.cli"]


def test_piped_chat_prints_the_answer_and_exits_0(home, tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'chat.db'}"
    r = subprocess.run(
        [*_duogen(), "chat", "--preset", "tiny", "--session", "pipe", "--db", db],
        input="Plan a picnic\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "steps" in r.stdout and "/images/" in r.stdout and ".png" in r.stdout
    assert "\x1b" not in r.stdout  # a plain log: no escapes, no live redraws
    r = subprocess.run(
        [*_duogen(), "chat", "--session", "pipe", "--db", db],
        input="/export md\n/open nope\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "no session 'nope'" in r.stderr  # a failed command fails the script
    assert (tmp_path / "pipe.md").exists()


class Tmux:
    def __init__(self, sock: Path) -> None:
        self.sock = str(sock)

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, check=True).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-J", "-S", "-2000", "-t", "chat")

    def wait_for(self, predicate, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"timed out; the screen was:\n{self.screen()}")

    def type(self, text: str) -> None:
        self("send-keys", "-t", "chat", "-l", text)
        self("send-keys", "-t", "chat", "Enter")


@pytest.mark.slow
def test_chat_in_tmux(home, tmp_path) -> None:
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            raise AssertionError("CI must have tmux for the chat test")
        pytest.skip("tmux is not installed")
    slow = tmp_path / "slow.toml"
    slow.write_text('base = "tiny"\n[image]\nsteps = 200\n')
    db = tmp_path / "chat.db"
    cmd = " ".join(
        [
            f"cd {tmp_path} &&",
            f"DUOGEN_HOME={home} PYTHONPATH={Path(__file__).resolve().parent.parent}",
            *_duogen(),
            "chat --preset tiny --session t1 --images halfcell",
            f"--db sqlite:///{db};",
            "echo CHAT-EXITED $?; sleep 120",
        ]
    )
    tmux = Tmux(tmp_path / "tmux.sock")
    tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "50", cmd)
    try:
        tmux.wait_for(lambda s: "you>" in s)
        tmux.type("Plan a picnic")
        screen = tmux.wait_for(lambda s: s.count("you>") >= 2 and "Image 1:" in s)
        assert "steps" in screen and "━" * 24 in screen and "▀" in screen
        assert "Image 1: " in screen and ".png" in screen.split("Image 1: ")[1].splitlines()[0]

        tmux.type("/sessions")
        screen = tmux.wait_for(lambda s: "* t1" in s)

        # Ctrl-C while an image is drawing cancels the turn; the session stays as it was.
        tmux.type("/preset " + str(slow))
        tmux.wait_for(lambda s: "preset slow" in s)
        tmux.type("Draw a kite")
        tmux.wait_for(lambda s: "/200 steps" in s.split("Draw a kite")[-1], timeout=300)
        tmux("send-keys", "-t", "chat", "C-c")
        tmux.wait_for(lambda s: "cancelled" in s.split("Draw a kite")[-1])
        tmux.type("/preset tiny")
        tmux.type("And a second picnic")
        tmux.wait_for(lambda s: "you>" in s.split("And a second picnic")[-1], timeout=300)
        tmux.type("/quit")
        tmux.wait_for(lambda s: "CHAT-EXITED 0" in s)
    finally:
        subprocess.run(["tmux", "-S", tmux.sock, "kill-server"], capture_output=True)
    with sqlite3.connect(db) as c:
        statuses = [r[0] for r in c.execute("SELECT status FROM duogen_turns ORDER BY number")]
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert statuses == ["complete", "cancelled", "complete"]


def test_chat_resumes_or_discards_an_unfinished_turn(home, tmp_path) -> None:
    """A session whose last turn was cut short (a crash, a kill) is not a dead end in the chat: a
    message says what to do, /resume finishes the turn, /discard drops one (before, only `duogen run`
    could, and every chat message was refused)."""
    import io

    from rich.console import Console

    from duogen_agents import Agent
    from duogen_agents.sessions import Sessions
    from duogen_agents.storage.database import Database
    from duogen_agents.terminal.chat import ChatApp

    db_url = f"sqlite:///{tmp_path / 'chat.db'}"
    agent = Agent.from_preset("tiny", home=home)

    def cut_short(prompt: str) -> None:
        db = Database.open(db_url, home=home)
        events = agent.session("pend", database=db).stream(prompt, mode="visual-plan")
        next(events)
        events.close()  # the turn is marked interrupted, as after Ctrl-C or a kill
        db.close()

    def statuses() -> list[str]:
        sessions = Sessions.open(db_url, home=home)
        try:
            return [t.status for t in sessions.turns("pend")]
        finally:
            sessions.close()

    def chat(*lines: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        app = ChatApp(
            preset="tiny", session_id="pend", db=db_url, home=home, images="none", interactive=False,
            console=Console(file=out, width=200), err=Console(file=err, width=200),
        )  # fmt: skip
        code = app.run(stdin=[f"{line}\n" for line in lines])
        return code, out.getvalue(), err.getvalue()

    cut_short("Plan a picnic")
    code, out, err = chat("Now add a blanket")
    assert code == 1 and "has an unfinished turn: /resume continues it, /discard drops it" in err
    code, out, err = chat("/resume", "/discard")
    assert "no unfinished turn; nothing to discard" in err  # /resume finished it
    assert statuses() == ["complete"]
    cut_short("Now add a blanket")
    code, out, err = chat("/discard", "Draw a pot")
    assert code == 0, err
    assert "dropped the unfinished turn" in out
    assert statuses() == ["complete", "cancelled", "complete"]


def test_chat_loads_a_preset_by_what_it_is_and_ctrl_c_while_loading_keeps_the_chat(home, tmp_path, monkeypatch) -> None:
    """``/preset`` kept agents by preset name, so a second file of the same name (or the same file
    edited) silently used the first one's models and settings; Ctrl-C while a preset loaded left the
    chat altogether, where during an answer it only cancels that message."""
    from duogen_agents import Agent
    from duogen_agents.errors import ConfigError
    from duogen_agents.presets import load_preset
    from duogen_agents.terminal.chat import ChatApp

    for folder, steps in (("a", 3), ("b", 9)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.toml").write_text(f'base = "tiny"\nname = "x"\n\n[image]\nsteps = {steps}\n')
    loaded: list[int] = []
    monkeypatch.setattr(Agent, "from_preset", staticmethod(lambda preset, **kw: loaded.append(preset.image.steps)))
    app = ChatApp(preset="tiny", session_id="p", db=f"sqlite:///{tmp_path / 'chat.db'}", home=home,
                  images="none", interactive=False)  # fmt: skip
    for folder in ("a", "b", "a"):
        app.preset = load_preset(str(tmp_path / folder / "x.toml"))
        app.agent()
    assert loaded == [3, 9]  # each file's own settings; the first again without a reload

    def interrupted(preset, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Agent, "from_preset", staticmethod(interrupted))
    app.preset = load_preset("tiny")
    with pytest.raises(ConfigError, match="loading preset 'tiny' was interrupted; nothing was sent"):
        app.agent()
