"""``duogen chat``: a terminal chat over the public API (``Agent``, ``Session``, ``Sessions`` and the
stream events). It adds no generation logic of its own: it reads messages, sends them to a session,
and renders the events (streamed Markdown, a progress bar per image, the image inline and its path).

Interactive: readline input with history (``<home>/chat_history``), a trailing ``\\`` continues a
message on the next line, Ctrl-C during an answer cancels that turn (the session goes back to where
it was), Ctrl-C or Ctrl-D at the prompt exits. Piped: stdin is read as messages separated by blank
lines (a line starting with ``/`` is a command), each answer is printed, and the exit code is 0 when
every message was answered.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.table import Table

from duogen_agents import interrupts
from duogen_agents.errors import ConfigError, DuogenError
from duogen_agents.terminal.render import StepProgress, detect_image_mode, image_view, sessions_table

PROMPT = "you> "
MORE = "...> "

COMMANDS = {
    "/new": "start a new session",
    "/sessions": "list the sessions",
    "/open ID": "continue session ID",
    "/mode M": "interleaved, visual-plan or draft",
    "/preset P": "switch preset (a built-in name or a .toml/.json file)",
    "/attach PATH": "attach an image to the next message",
    "/redraw N": "draw image N of this session again",
    "/export [html|md|json]": "write this session to ./<session>.<format>",
    "/help": "this list",
    "/quit": "leave (Ctrl-D and Ctrl-C at the prompt do too)",
}

_TEXT_FIELD = re.compile(r'"text"\s*:\s*"((?:[^"\\]|\\.)*)')


def partial_text(raw: str) -> str:
    """The ``text`` field of a planner action still being written (JSON prefix), decoded so far."""
    m = _TEXT_FIELD.search(raw)
    if not m:
        return ""
    body = m.group(1)
    for cut in range(len(body), max(len(body) - 6, -1), -1):  # drop a half-written escape
        try:
            return str(json.loads(f'"{body[:cut]}"'))
        except json.JSONDecodeError:
            continue
    return ""


def piped_messages(text: str) -> list[str]:
    """Split piped input: blank lines separate messages; a line starting with ``/`` is a command."""
    items: list[str] = []
    buf: list[str] = []

    def flush() -> None:
        if buf and "\n".join(buf).strip():
            items.append("\n".join(buf).strip())
        buf.clear()

    for line in text.splitlines():
        if line.startswith("/"):
            flush()
            items.append(line.strip())
        elif not line.strip():
            flush()
        else:
            buf.append(line)
    flush()
    return items


class ChatApp:
    def __init__(
        self,
        *,
        preset: str = "tiny",
        mode: str | None = None,
        session_id: str | None = None,
        db: str | None = None,
        home: Path | None = None,
        images: str = "auto",
        wait: float | None = None,
        console: Console | None = None,
        err: Console | None = None,
        interactive: bool | None = None,
    ) -> None:
        from duogen_agents.presets import load_preset
        from duogen_agents.sessions import Sessions
        from duogen_agents.storage.database import check_session_id

        self.console = console or Console()
        self.err = err or Console(stderr=True)
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self.preset = load_preset(preset)
        self.mode = mode
        self.home = home
        self.wait = wait
        self.sessions = Sessions.open(db, home=home)
        self.session_id = check_session_id(session_id) if session_id is not None else self._new_id()
        self.image_mode = detect_image_mode(self.console) if images == "auto" else images
        self.attachments: list[str] = []
        self._agents: dict[str, Any] = {}
        self._session: Any = None
        self.failed = False

    # ---- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _new_id() -> str:
        return f"chat-{secrets.token_hex(3)}"

    def agent(self) -> Any:
        from duogen_agents.agent import Agent

        key = self.preset.name
        if key not in self._agents:
            if self.preset.is_tiny:
                self.err.print(
                    f"[yellow]note:[/] preset {key!r} uses random weights: its words and pictures are noise."
                )
            with self.err.status(f"loading preset {key}..."):
                self._agents[key] = Agent.from_preset(self.preset, home=self.home)
        return self._agents[key]

    def session(self) -> Any:
        agent = self.agent()
        s = self._session
        if s is None or s.id != self.session_id or s.agent is not agent:
            self._session = s = agent.session(self.session_id, database=self.sessions.db, wait=self.wait)
        return s

    def image_count(self) -> int:
        if not self.sessions.exists(self.session_id):
            return 0
        return sum(len(t.document.images) for t in self.sessions.turns(self.session_id) if t.status == "complete")

    def error(self, message: str) -> None:
        self.failed = True
        self.err.print(f"[red]error:[/] {message}", highlight=False)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, stdin: Iterable[str] | None = None) -> int:
        try:
            if self.interactive:
                self._interactive()
                return 0
            text = "".join(stdin) if stdin is not None else sys.stdin.read()
            for item in piped_messages(text):
                if not self.handle(item):
                    break
            return 1 if self.failed else 0
        finally:
            self.sessions.close()

    def _interactive(self) -> None:
        history = self._readline()
        self.console.print(
            f"[bold]duogen chat[/] - session [bold]{self.session_id}[/], preset {self.preset.name}. "
            "/help lists the commands; a line ending in \\ continues the message.",
            highlight=False,
        )
        while True:
            try:
                text = self._read()
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                break
            interrupts.handled()  # a Ctrl-C of an earlier answer is dealt with
            if not text.strip():
                continue
            if not self.handle(text):
                break
        if history is not None:
            history()

    def _readline(self) -> Any:
        try:
            import readline
        except ImportError:  # pragma: no cover (Windows without pyreadline)
            return None
        path = (self.home or self.sessions.store.root) / "chat_history"
        try:
            readline.read_history_file(path)
        except OSError:
            pass
        readline.set_history_length(1000)

        def save() -> None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)
            except OSError:
                pass

        return save

    def _read(self) -> str:
        lines = [input(PROMPT)]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input(MORE))
        return "\n".join(lines)

    def handle(self, text: str) -> bool:
        """One message or command; returns False to leave the chat."""
        text = text.strip()
        try:
            if text.startswith("/"):
                return self.command(text)
            self.send(text)
        except DuogenError as e:
            self.error(str(e))
        return True

    # ---- messages -------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        session = self.session()
        attachments, self.attachments = self.attachments, []
        self._answer(session, session.stream(text, mode=self.mode, images=attachments))

    def _answer(self, session: Any, events: Iterator[dict[str, Any]]) -> None:
        try:
            self.show(events)
        except KeyboardInterrupt:
            events.close()  # the turn is marked interrupted and its lock released
            if session.cancel():
                self.err.print("[yellow]cancelled[/]: the session is as it was before this message")
            else:
                self.err.print("[yellow]cancelled[/] after the answer was stored")
            interrupts.handled()

    def show(self, events: Iterator[dict[str, Any]]) -> Any:
        """Render one turn's events; returns its document."""
        first = self.image_count()
        live_ok = self.console.is_terminal
        raw = ""
        text_live: Live | None = None  # the text being written (transient: replaced by the final Markdown)
        image_live: Live | None = None  # the progress bar of the image being drawn (stays, finished)
        progress: StepProgress | None = None
        doc = None

        def stop_text() -> None:
            nonlocal text_live
            if text_live is not None:
                text_live.stop()
                text_live = None

        def stop_image() -> None:
            nonlocal image_live
            if image_live is not None:
                image_live.stop()
                image_live = None

        try:
            for event in events:
                kind = event["event"]
                if kind == "token":
                    raw += event["text"]
                    partial = partial_text(raw)
                    if partial and live_ok:
                        if text_live is None:
                            text_live = Live(console=self.console, transient=True, refresh_per_second=12)
                            text_live.start()
                        text_live.update(Markdown(partial))
                    continue
                raw = ""
                stop_text()
                if kind == "plan":
                    self.console.print(Markdown(f"# {event['title']}"))
                elif kind == "text":
                    self.console.print(Markdown(event["text"]))
                elif kind == "image_start":
                    stop_image()
                    label = "draft" if event["origin"] == "draft" else "image"
                    progress = StepProgress(f"{label} {first + event['index']}", self.agent().preset.image.steps)
                    if live_ok:
                        image_live = Live(progress, console=self.console, refresh_per_second=8)
                        image_live.start()
                elif kind == "image_progress" and progress is not None:
                    progress.update(event["step"], event["total"])
                    if image_live is not None:
                        image_live.update(progress, refresh=True)
                elif kind == "image_ready":
                    n = first + event["index"]
                    label = "Draft sketch" if event["origin"] == "draft" else "Image"
                    if progress is not None:
                        progress.done()
                        if image_live is not None:
                            image_live.update(progress, refresh=True)
                        else:  # a log gets the finished bar, once
                            self.console.print(progress)
                    stop_image()
                    progress = None
                    view = image_view(
                        self.sessions.store.open(event["image"]["id"]), self.image_mode, min(48, self.console.width)
                    )
                    if view is not None:
                        self.console.print(view)
                    self.console.print(f"[dim]{label} {n}: {event['path']}[/]", highlight=False, soft_wrap=True)
                elif kind == "image_rejected":
                    stop_image()
                    progress = None
                    self.err.print(f"[dim]redrawing: the check said {event['note']!r}[/]", highlight=False)
                elif kind == "document":
                    doc = event["document"]
        finally:
            stop_text()
            stop_image()
        return doc

    # ---- commands -------------------------------------------------------------------------------

    def command(self, text: str) -> bool:
        from duogen_agents.graphs.state import MODES
        from duogen_agents.inputs import load_input_image
        from duogen_agents.presets import load_preset
        from duogen_agents.storage.database import check_session_id

        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            t = Table(box=None, show_header=False, pad_edge=False)
            for cmd, what in COMMANDS.items():
                t.add_row(cmd, what)
            self.console.print(t)
        elif name == "/new":
            self.session_id = self._new_id()
            self.console.print(f"new session [bold]{self.session_id}[/]", highlight=False)
        elif name == "/sessions":
            items = self.sessions.list()
            if items:
                self.console.print(sessions_table(items, current=self.session_id))
            else:
                self.console.print("no sessions yet")
        elif name == "/open":
            if not arg:
                raise ConfigError("usage: /open ID (see /sessions)")
            info = self.sessions.get(check_session_id(arg))
            self.session_id = info.id
            note = " [yellow](its last turn is unfinished)[/]" if info.pending else ""
            self.console.print(f"opened [bold]{info.id}[/]: {info.turns} turn(s), {info.images} image(s){note}")
        elif name == "/mode":
            if arg not in MODES:
                raise ConfigError(f"usage: /mode {'|'.join(MODES)}")
            self.mode = arg
            self.console.print(f"mode {arg}")
        elif name == "/preset":
            if not arg:
                raise ConfigError("usage: /preset NAME (duogen presets lists them)")
            self.preset = load_preset(arg)
            self.console.print(f"preset {self.preset.name} (loaded with the next message)")
        elif name == "/attach":
            if not arg:
                raise ConfigError("usage: /attach PATH")
            load_input_image(arg)
            self.attachments.append(arg)
            self.console.print(f"attached {arg} to the next message ({len(self.attachments)} image(s))")
        elif name == "/redraw":
            if not arg.isdigit():
                raise ConfigError("usage: /redraw N (the image number shown under each image)")
            session = self.session()
            self._answer(session, session.redraw(int(arg)))
        elif name == "/export":
            fmt = arg or "html"
            if fmt not in ("html", "md", "json"):
                raise ConfigError("usage: /export [html|md|json]")
            out = Path.cwd() / f"{self.session_id}.{fmt}"
            self.sessions.export(self.session_id, fmt, out)
            self.console.print(f"wrote {out}", highlight=False, soft_wrap=True)
        else:
            raise ConfigError(f"unknown command {name}; /help lists the commands")
        return True
