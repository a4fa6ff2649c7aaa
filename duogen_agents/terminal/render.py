"""Terminal renderables (rich): half-block image previews and the streamed answer.

``HalfBlockImage`` is a rich renderable: each character cell shows two pixels with the upper-half
block (foreground = top pixel, background = bottom pixel) in truecolor.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from PIL import Image
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style


class HalfBlockImage:
    def __init__(self, image: Image.Image, max_width: int = 48) -> None:
        self.image = image.convert("RGB")
        self.max_width = max_width

    def _scaled(self, width: int) -> Image.Image:
        w = max(1, min(width, self.max_width, self.image.width))
        h = max(2, round(self.image.height * w / self.image.width))
        h += h % 2
        return self.image.resize((w, h), Image.Resampling.BOX)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        im = self._scaled(options.max_width)
        px: Any = im.load()
        for y in range(0, im.height, 2):
            for x in range(im.width):
                top, bottom = px[x, y], px[x, y + 1]
                yield Segment(
                    "▀",
                    Style(
                        color=f"rgb({top[0]},{top[1]},{top[2]})", bgcolor=f"rgb({bottom[0]},{bottom[1]},{bottom[2]})"
                    ),
                )
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Any:
        from rich.measure import Measurement

        w = min(options.max_width, self.max_width, self.image.width)
        return Measurement(w, w)


IMAGE_MODES = ("auto", "sixel", "kitty", "halfcell", "off")


def detect_image_mode(console: Console, env: Mapping[str, str] | None = None) -> str:
    """The best inline-image protocol this terminal is known to speak, from its environment.

    kitty graphics for kitty, Ghostty and WezTerm; sixel for foot, mlterm, Windows Terminal and
    terminals that say so in ``$TERM``; truecolor half-blocks otherwise; ``off`` when not a terminal.
    (No escape-sequence query: it would need raw-mode reads and can hang behind tmux or ssh.)
    """
    env = os.environ if env is None else env
    if not console.is_terminal:
        return "off"
    term = env.get("TERM", "")
    program = env.get("TERM_PROGRAM", "")
    if env.get("TMUX"):
        return "halfcell"  # tmux passes neither protocol through by default
    if term == "xterm-kitty" or env.get("KITTY_WINDOW_ID") or program in ("ghostty", "WezTerm"):
        return "kitty"
    if "sixel" in term or term.startswith(("foot", "mlterm")) or env.get("WT_SESSION"):
        return "sixel"
    return "halfcell"


class KittyImage:
    """The image as a kitty graphics-protocol escape (PNG, sent in 4096-byte chunks)."""

    def __init__(self, image: Image.Image, columns: int = 48) -> None:
        self.image = image.convert("RGB")
        self.columns = columns

    def escape(self, columns: int) -> str:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        data = base64.standard_b64encode(buf.getvalue()).decode()
        chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)] or [""]
        out = []
        for i, chunk in enumerate(chunks):
            more = 1 if i < len(chunks) - 1 else 0
            head = f"a=T,f=100,c={columns},m={more}" if i == 0 else f"m={more}"
            out.append(f"\x1b_G{head};{chunk}\x1b\\")
        return "".join(out)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Segment(self.escape(min(self.columns, options.max_width)), control=[])  # type: ignore[arg-type]
        yield Segment.line()


class SixelImage:
    """The image as DEC sixel graphics (quantized to 256 colours)."""

    def __init__(self, image: Image.Image, max_pixels_wide: int = 512) -> None:
        im = image.convert("RGB")
        if im.width > max_pixels_wide:
            im = im.resize((max_pixels_wide, max(1, round(im.height * max_pixels_wide / im.width))))
        self.image = im

    def escape(self) -> str:
        q = self.image.quantize(colors=256)
        palette = q.getpalette() or []
        w, h = q.size
        px: Any = q.load()
        used = sorted({px[x, y] for y in range(h) for x in range(w)})
        parts = ['\x1bPq"1;1;' + f"{w};{h}"]
        for c in used:
            r, g, b = palette[3 * c : 3 * c + 3]
            parts.append(f"#{c};2;{r * 100 // 255};{g * 100 // 255};{b * 100 // 255}")
        for band in range(0, h, 6):
            rows = range(band, min(band + 6, h))
            colours = sorted({px[x, y] for y in rows for x in range(w)})
            for n, c in enumerate(colours):
                line = []
                for x in range(w):
                    bits = sum(1 << (y - band) for y in rows if px[x, y] == c)
                    line.append(chr(63 + bits))
                parts.append(f"#{c}" + "".join(line) + ("$" if n < len(colours) - 1 else ""))
            parts.append("-")
        parts.append("\x1b\\")
        return "".join(parts)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Segment(self.escape(), control=[])  # type: ignore[arg-type]
        yield Segment.line()


def image_view(image: Image.Image, mode: str, max_width: int = 48) -> Any | None:
    """The renderable for ``mode`` (``sixel``, ``kitty``, ``halfcell``), or ``None`` for ``off``."""
    if mode == "kitty":
        return KittyImage(image, columns=max_width)
    if mode == "sixel":
        return SixelImage(image)
    if mode == "halfcell":
        return HalfBlockImage(image, max_width=max_width)
    return None


class StepProgress:
    """One image's progress: ``image 2  ━━━━━━━╸━━━━━━  3/8 steps  0:00:04``."""

    def __init__(self, label: str, total: int, started: float | None = None) -> None:
        self.label = label
        self.total = max(1, total)
        self.step = 0
        self.started = time.monotonic() if started is None else started
        self.elapsed: float | None = None  # frozen when done

    def update(self, step: int, total: int | None = None) -> None:
        self.step = step
        if total:
            self.total = max(1, total)

    def done(self) -> None:
        self.step = self.total
        self.elapsed = time.monotonic() - self.started

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        secs = int(self.elapsed if self.elapsed is not None else time.monotonic() - self.started)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(width=24)
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        grid.add_row(
            self.label,
            ProgressBar(total=self.total, completed=self.step, width=24),
            f"{self.step}/{self.total} steps",
            f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}",
        )
        yield grid


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def strip_controls(text: object) -> str:
    """``text`` without terminal control characters (ESC, OSC and C1 sequences); newlines and tabs stay."""
    return _CONTROL.sub("", str(text))


def safe_text(text: object) -> str:
    """Stored or model text made safe to print with Rich: no terminal control sequences (ESC, OSC,
    C1), and square brackets escaped so they are shown, not read as markup."""
    from rich.markup import escape

    return escape(strip_controls(text))


def local_time(when: datetime) -> str:
    """A stored time (aware, UTC) as the terminal shows it: in this machine's local time zone, to the
    minute. Both backends give the same instant, so the same session reads the same on either."""
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def sessions_table(items: Any, current: str | None = None, width: int | None = None) -> Any:
    """The sessions as a borderless table; the title column takes what width is left. In a
    ``width`` too narrow for every column, the least needed go (preset, mode, updated, images,
    turns, in that order): the id and the state always show, whole."""
    from rich.table import Table

    names = ("id", "turns", "images", "mode", "preset", "updated", "state")
    rows = [
        (
            ("* " if i.id == current else "") + i.id, str(i.turns), str(i.images), i.mode, i.preset,
            "?" if i.malformed else local_time(i.updated_at),
            "malformed" if i.malformed else "unfinished turn" if i.pending else "ok",
        )
        for i in items
    ]  # fmt: skip
    widths = [max(len(name), *(len(r[k]) for r in rows)) for k, name in enumerate(names)]
    shown = list(range(len(names)))
    for k in (4, 3, 5, 2, 1):  # past ``width``, rich would shrink any column, the id's too, to nothing
        if width is None or sum(widths[j] + 2 for j in shown) <= width:
            break
        shown.remove(k)
    t = Table(box=None, pad_edge=False)
    for k in shown:
        t.add_column(names[k], no_wrap=True, min_width=widths[k])
    t.add_column("title", no_wrap=True, overflow="ellipsis")
    for i, row in zip(items, rows, strict=True):
        t.add_row(*(safe_text(row[k]) for k in shown), safe_text(i.title or ""))
    return t
