"""One model call at a time per device, in arrival order, with a bounded queue.

A loaded preset may be shared by any number of threads, asyncio tasks or server runs; the library,
never the caller, serialises the model calls: the planner's and the image pipelines' calls on one
device take turns (first come, first served), because running them side by side on one GPU is
slower than one after the other (measured: 1.75x) and shares state that is not thread-safe (the
global torch RNG a seed sets, a diffusers scheduler's step index). More than ``max_waiting`` callers
waiting is refused with ``GenerationError`` rather than queued without bound.

>>> with device_turn("cuda:0"):                     # doctest: +SKIP
...     pipe(...)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from duogen_agents.errors import GenerationError

DEFAULT_MAX_WAITING = 64


class DeviceQueue:
    """A fair (FIFO) lock: each caller takes a ticket and is served in ticket order. Re-entrant
    for the thread holding it (a model call that makes another on the same device)."""

    def __init__(self, name: str, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        self.name = name
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._owner: int | None = None
        self._depth = 0
        self._abandoned: set[int] = set()  # tickets whose callers gave up waiting

    @property
    def waiting(self) -> int:
        with self._cond:
            held = 1 if self._owner is not None else 0
            return self._next_ticket - self._serving - len(self._abandoned) - held

    @contextlib.contextmanager
    def turn(self, timeout: float | None = None) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                reentrant = True
            else:
                reentrant = False
                busy = self._next_ticket - self._serving - len(self._abandoned)  # the holder and the waiters
                if busy > self.max_waiting:
                    raise GenerationError(
                        f"{busy - 1} calls are already waiting for {self.name}; try again later "
                        f"(DUOGEN_MAX_WAITING raises the limit of {self.max_waiting})"
                    )
                ticket = self._next_ticket
                self._next_ticket += 1
                if not self._cond.wait_for(lambda: self._serving == ticket and self._owner is None, timeout):
                    self._abandoned.add(ticket)  # skipped when its turn comes
                    self._skip_abandoned()
                    raise GenerationError(f"waited more than {timeout:.0f} s for {self.name}")
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                if reentrant:
                    self._depth -= 1
                else:
                    self._owner, self._depth = None, 0
                    self._serving += 1
                    self._skip_abandoned()
                    self._cond.notify_all()

    def _skip_abandoned(self) -> None:
        while self._serving in self._abandoned and self._owner is None:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


_queues: dict[str, DeviceQueue] = {}
_registry_lock = threading.Lock()


def device_key(device: object) -> str:
    """``cuda`` and ``cuda:0`` are one device; so are all CPU calls."""
    name = str(device)
    if name == "cuda":
        return "cuda:0"
    return name.split(":")[0] if name.startswith(("cpu", "mps")) else name


def device_queue(device: object) -> DeviceQueue:
    key = device_key(device)
    with _registry_lock:
        queue = _queues.get(key)
        if queue is None:
            limit = int(os.environ.get("DUOGEN_MAX_WAITING", DEFAULT_MAX_WAITING))
            queue = _queues[key] = DeviceQueue(f"the {key} device", limit)
        return queue


def device_turn(device: object, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
    """Hold ``device`` for one model call (see the module docstring)."""
    return device_queue(device).turn(timeout)
