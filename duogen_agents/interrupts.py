"""Ctrl-C in the terminal: the first one interrupts, a second one leaves at once, quietly.

The first Ctrl-C raises ``KeyboardInterrupt`` as usual, so the turn is marked interrupted, its lock
released and a line printed. A second Ctrl-C while that clean-up (or the interpreter's shutdown)
runs would otherwise land in library code and print tracebacks; instead the process exits with 130
at once. Nothing is lost by that: checkpoints are written per step, and the turn resumes with
``duogen run --session ID --resume`` as after a crash.

>>> with ctrl_c_twice_exits():     # doctest: +SKIP
...     run_the_command()
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

EXIT_INTERRUPTED = 130
_state = {"pending": False}


def _on_sigint(signum: int, frame: Any) -> None:
    if _state["pending"]:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EXIT_INTERRUPTED)
    _state["pending"] = True
    raise KeyboardInterrupt


def handled() -> None:
    """The first Ctrl-C has been dealt with (the chat cancelled a turn and goes on): the next one
    interrupts again instead of exiting."""
    _state["pending"] = False


@contextlib.contextmanager
def ctrl_c_twice_exits(*, process_exits: bool = False) -> Iterator[None]:
    """Install the handler for the ``with`` block (main thread only; elsewhere a no-op).

    ``process_exits``: the process ends after the block (the ``duogen`` command), so after a Ctrl-C
    further ones are ignored through the interpreter's shutdown; otherwise (``cli.main`` called from
    other code) the previous handler is always restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _state["pending"] = False
    try:
        yield
    finally:
        # After a Ctrl-C the process is on its way out (exit code 130): a second one during the
        # interpreter's shutdown is ignored (a Python handler would be reset to the default there,
        # and the default kills the process with a signal instead of 130).
        signal.signal(signal.SIGINT, signal.SIG_IGN if _state["pending"] and process_exits else previous)
        _state["pending"] = False


EXIT_TERMINATED = 143  # 128 + SIGTERM


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[dict[str, Any]]:
    """SIGTERM (a job scheduler's time limit, ``timeout``, ``kill``) and SIGHUP (the terminal or the SSH
    session closed) raise ``KeyboardInterrupt`` in the ``with`` block as Ctrl-C does, so the command
    keeps what finished and says so; the yielded dict's ``terminated`` tells them from Ctrl-C, with
    the ``signal``'s name and the shell's exit ``code`` for it (128 + its number: 143, 129). Main
    thread only (elsewhere a no-op); the previous handlers are restored after the block."""
    state: dict[str, Any] = {"terminated": False, "signal": None, "code": EXIT_TERMINATED}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def on_signal(signum: int, frame: Any) -> None:
        if state["terminated"]:  # a second one while the first is dealt with: leave at once
            os._exit(128 + signum)
        state.update(terminated=True, signal=signal.Signals(signum).name, code=128 + signum)
        raise KeyboardInterrupt

    handled = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
