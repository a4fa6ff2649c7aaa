"""One renderer of a turn's events, shared by ``duogen run`` and ``duogen chat``.

Text streams as Markdown while the planner writes it (a transient live view, replaced by the final
Markdown), each image shows a step progress bar, then the image inline (``image_mode``: kitty, sixel,
half-blocks, or off) and always its file path. On a log (not a terminal) nothing is redrawn: each
finished bar is printed once. Progress and redraw notes go to ``status`` (stderr for ``run``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from duogen_agents.terminal.render import StepProgress, image_view, safe_text, strip_controls

_TEXT_FIELD = re.compile(r'"text"\s*:\s*"((?:[^"\\]|\\.)*)')
# Longest JSON escape (\uXXXX): a half-written one is dropped from the live text.
_LONGEST_ESCAPE = 6
TEXT_REFRESH_PER_SECOND = 12
IMAGE_REFRESH_PER_SECOND = 8
PREVIEW_MAX_WIDTH = 48


def partial_text(raw: str) -> str:
    """The ``text`` field of a planner action still being written (JSON prefix), decoded so far."""
    m = _TEXT_FIELD.search(raw)
    if not m:
        return ""
    body = m.group(1)
    for cut in range(len(body), max(len(body) - _LONGEST_ESCAPE, -1), -1):
        try:
            return str(json.loads(f'"{body[:cut]}"'))
        except json.JSONDecodeError:
            continue
    return ""


class EventRenderer:
    """Renders one turn's events on ``console``; ``render`` returns the turn's document.

    ``open_image(id)`` loads an image for the inline view; ``first`` numbers images after the
    session's earlier ones; ``steps`` is the denoising step count shown before the first update."""

    def __init__(
        self,
        console: Console,
        *,
        status: Console | None = None,
        open_image: Any = None,
        image_mode: str = "off",
        steps: int = 1,
        first: int = 0,
    ) -> None:
        self.console = console
        self.status = status or console
        self.open_image = open_image
        self.image_mode = image_mode
        self.steps = steps
        self.first = first
        self._text: Live | None = None  # the text being written (transient)
        self._image: Live | None = None  # the progress bar of the image being drawn
        self._progress: StepProgress | None = None

    def _stop_text(self) -> None:
        if self._text is not None:
            self._text.stop()
            self._text = None

    def _stop_image(self) -> None:
        if self._image is not None:
            self._image.stop()
            self._image = None

    def render(self, events: Iterator[dict[str, Any]]) -> Any:
        raw = ""
        doc = None
        live_ok = self.console.is_terminal
        try:
            for event in events:
                kind = event["event"]
                if kind == "token":
                    raw += event["text"]
                    partial = partial_text(raw)
                    if partial and live_ok:
                        if self._text is None:
                            self._text = Live(
                                console=self.console, transient=True, refresh_per_second=TEXT_REFRESH_PER_SECOND
                            )
                            self._text.start()
                        self._text.update(Markdown(strip_controls(partial)))
                    continue
                raw = ""
                self._stop_text()
                if kind == "document":
                    doc = event["document"]
                else:
                    self._event(kind, event)
        finally:
            self._stop_text()
            self._stop_image()
        return doc

    def _event(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "plan":
            self.console.print(Markdown(f"# {strip_controls(event['title'])}"))
        elif kind == "text":
            self.console.print(Markdown(strip_controls(event["text"])))
        elif kind == "image_start":
            self._stop_image()
            label = "draft" if event["origin"] == "draft" else "image"
            self._progress = StepProgress(f"{label} {self.first + event['index']}", self.steps)
            if self.status.is_terminal:
                self._image = Live(self._progress, console=self.status, refresh_per_second=IMAGE_REFRESH_PER_SECOND)
                self._image.start()
        elif kind == "image_progress" and self._progress is not None:
            self._progress.update(event["step"], event["total"])
            if self._image is not None:
                self._image.update(self._progress, refresh=True)
        elif kind == "image_ready":
            if self._progress is not None:
                self._progress.done()
                if self._image is not None:
                    self._image.update(self._progress, refresh=True)
                else:  # a log gets the finished bar, once
                    self.status.print(self._progress)
            self._stop_image()
            self._progress = None
            label = "Draft sketch" if event["origin"] == "draft" else "Image"
            if self.open_image is not None and self.image_mode != "off":
                view = image_view(
                    self.open_image(event["image"]["id"]), self.image_mode, min(PREVIEW_MAX_WIDTH, self.console.width)
                )
                if view is not None:
                    self.console.print(view)
            n = self.first + event["index"]
            self.console.print(f"[dim]{label} {n}: {safe_text(event['path'])}[/]", highlight=False, soft_wrap=True)
        elif kind == "image_rejected":
            self._stop_image()
            self._progress = None
            self.status.print(f"[dim]redrawing: the check said {safe_text(repr(event['note']))}[/]", highlight=False)
