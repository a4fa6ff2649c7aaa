"""Terminal renderables (rich): half-block image previews and the streamed answer.

``HalfBlockImage`` is a rich renderable: each character cell shows two pixels with the upper-half
block (foreground = top pixel, background = bottom pixel) in truecolor.
"""

from __future__ import annotations

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
