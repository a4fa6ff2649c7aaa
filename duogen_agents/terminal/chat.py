"""``duogen chat``: a terminal chat over the public API (``Agent``, ``Session``, ``Sessions`` and the
stream events). It adds no generation logic of its own: it reads messages, sends them to a session,
and renders the events (streamed Markdown, a progress bar per image, the image inline and its path).

Interactive: readline input with history (``<home>/chat_history``), a trailing ``\\`` continues a
message on the next line, Ctrl-C during an answer cancels that turn (the session goes back to where
it was), Ctrl-C or Ctrl-D at the prompt exits. Piped: stdin is read as messages separated by blank
lines (a line starting with ``/`` is a command; a trailing ``\\`` is dropped, as typed), each answer is
printed, and the exit code is 0 when every message and command succeeded, 1 otherwise.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from duogen_agents import interrupts
from duogen_agents.errors import ConfigError, DuogenError, SessionStateError
from duogen_agents.terminal.events import EventRenderer
from duogen_agents.terminal.render import detect_image_mode, safe_text, sessions_table

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
    "/resume": "continue this session's unfinished turn (cut short by a crash or kill)",
    "/discard": "drop this session's unfinished turn: the session is as it was before it",
    "/export [html|md|json]": "write this session to ./<session>.<format>",
    "/help": "this list",
    "/quit": "leave (Ctrl-D and Ctrl-C at the prompt do too)",
}


def piped_messages(text: str) -> list[str]:
    """Split piped input: blank lines separate messages; a line starting with ``/`` is a command. A
    message's lines are joined as typed ones are, so a trailing ``\\`` (the interactive way to go on
    to the next line) is dropped here too rather than reaching the planner."""
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
            buf.append(line[:-1] if line.endswith("\\") else line)
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

        name = self.preset.name
        key = self.preset.model_dump_json()  # two preset files of one name (or one file edited) differ
        if key not in self._agents:
            if self.preset.is_tiny:
                self.err.print(
                    f"[yellow]note:[/] preset {name!r} uses random weights: its words and pictures are noise."
                )
            try:
                with self.err.status(f"loading preset {name}..."):
                    self._agents[key] = Agent.from_preset(self.preset, home=self.home)
            except KeyboardInterrupt:  # as Ctrl-C during an answer: back to the prompt, not out of the chat
                interrupts.handled()
                raise ConfigError(f"loading preset {name!r} was interrupted; nothing was sent") from None
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
        self.err.print(f"[red]error:[/] {safe_text(message)}", highlight=False)

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
        if self.sessions.exists(self.session_id) and self.sessions.get(self.session_id).pending:
            raise SessionStateError(
                f"session {self.session_id!r} has an unfinished turn: /resume continues it, /discard drops it"
            )
        session = self.session()
        attachments, self.attachments = self.attachments, []
        self._answer(session, session.stream(text, mode=self.mode, images=attachments))

    def _answer(self, session: Any, events: Iterator[dict[str, Any]], *, cancel: bool = True) -> None:
        """Show a turn. Ctrl-C cancels it (the session as it was before the message), or with
        ``cancel=False`` (a resumed turn, whose earlier progress a cancel would throw away) leaves it
        unfinished for another /resume."""
        try:
            self.show(events)
        except KeyboardInterrupt:
            events.close()  # the turn is marked interrupted and its lock released
            if not cancel:
                self.err.print(
                    "[yellow]stopped[/]: the turn is still unfinished; /resume continues it, /discard drops it"
                )
            elif session.cancel():
                self.err.print("[yellow]cancelled[/]: the session is as it was before this message")
            else:
                self.err.print("[yellow]cancelled[/] after the answer was stored")
            interrupts.handled()

    def show(self, events: Iterator[dict[str, Any]]) -> Any:
        """Render one turn's events; returns its document."""
        return EventRenderer(
            self.console,
            status=self.console,
            open_image=self.sessions.store.open,
            image_mode=self.image_mode,
            steps=self.agent().preset.image.steps,
            first=self.image_count(),
        ).render(events)

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
                self.console.print(sessions_table(items, current=self.session_id, width=self.console.width))
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
            self.console.print(f"mode {safe_text(arg)}")
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
            self.console.print(f"attached {safe_text(arg)} to the next message ({len(self.attachments)} image(s))")
        elif name == "/redraw":
            if not arg.isdigit():
                raise ConfigError("usage: /redraw N (the image number shown under each image)")
            session = self.session()
            self._answer(session, session.redraw(int(arg)))
        elif name == "/resume":
            session = self.session()
            self._answer(session, session.resume(), cancel=False)
        elif name == "/discard":
            if not self.sessions.exists(self.session_id) or not self.session().cancel():
                raise SessionStateError(f"session {self.session_id!r} has no unfinished turn; nothing to discard")
            self.console.print("dropped the unfinished turn: the session is as it was before it")
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
