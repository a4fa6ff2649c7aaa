"""Admission in front of each model: a bounded queue, and 429 with ``Retry-After`` when it is full.

The library already runs one model call per device at a time (``models.serial.device_turn``); the
gate bounds how many requests may wait for that, so an overloaded server answers at once instead of
letting requests pile up until their clients time out. It also measures how long each admitted
request waited, for ``/health`` and the ``x-duogen-queue-wait-ms`` response header.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The gate's queue is full; ``retry_after`` is the suggested wait in whole seconds."""

    def __init__(self, gate: str, retry_after: int) -> None:
        super().__init__(f"the {gate} queue is full; retry in {retry_after} s")
        self.gate = gate
        self.retry_after = retry_after


@dataclass
class Gate:
    """``concurrency`` requests run at once, up to ``queue`` more wait; the rest are refused."""

    name: str
    concurrency: int = 1
    queue: int = 16
    running: int = 0
    waiting: int = 0
    served: int = 0
    refused: int = 0
    wait_total_s: float = 0.0
    service_s: float = 1.0  # running mean of one request's service time, for Retry-After
    _sem: asyncio.Semaphore | None = field(default=None, repr=False)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # created on the server's event loop
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._sem

    def retry_after(self) -> int:
        ahead = self.waiting + self.running
        return max(1, math.ceil(self.service_s * ahead / max(1, self.concurrency)))

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited. Raises ``QueueFull`` at once when full."""
        if self.running + self.waiting >= self.concurrency + self.queue:
            self.refused += 1
            raise QueueFull(self.name, self.retry_after())
        self.waiting += 1
        start = time.monotonic()
        try:
            await self._semaphore().acquire()
        finally:
            self.waiting -= 1
        waited = time.monotonic() - start
        self.running += 1
        self.wait_total_s += waited
        return waited

    def release(self, service_s: float) -> None:
        self.running -= 1
        self.served += 1
        self.service_s = 0.8 * self.service_s + 0.2 * service_s if self.served > 1 else service_s
        self._semaphore().release()

    def stats(self) -> dict[str, float | int]:
        return {
            "running": self.running,
            "waiting": self.waiting,
            "concurrency": self.concurrency,
            "queue": self.queue,
            "served": self.served,
            "refused": self.refused,
            "mean_wait_ms": round(1000 * self.wait_total_s / self.served, 1) if self.served else 0.0,
        }


class Slot:
    """One admitted request: ``async with gate_slot(gate) as slot`` or, for a response that streams
    after the handler returns, ``await slot.enter()`` then ``slot.exit()`` when the stream ends."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.waited = 0.0
        self._start = 0.0
        self._held = False

    async def enter(self) -> Slot:
        self.waited = await self.gate.acquire()
        self._start = time.monotonic()
        self._held = True
        return self

    def exit(self) -> None:
        if self._held:
            self._held = False
            self.gate.release(time.monotonic() - self._start)

    async def __aenter__(self) -> Slot:
        return await self.enter()

    async def __aexit__(self, *exc: object) -> None:
        self.exit()


def in_thread(slot: Slot, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run ``fn(*args)`` in a worker thread holding ``slot`` until it returns, whatever happens to
    whoever awaits it (a client that hangs up cancels the request, never the model call, and the
    slot is given back when the call ends, not before). Await it through ``asyncio.shield``."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    future.add_done_callback(lambda _f: slot.exit())
    return future
