from __future__ import annotations

import io

from PIL import Image
from rich.console import Console

from duogen_agents.terminal.render import HalfBlockImage


def test_half_block_image_renders_two_pixels_per_cell() -> None:
    im = Image.new("RGB", (4, 4), (255, 0, 0))
    im.paste((0, 0, 255), (0, 2, 4, 4))  # bottom half blue
    buf = io.StringIO()
    Console(file=buf, width=20, force_terminal=True, color_system="truecolor").print(HalfBlockImage(im))
    out = buf.getvalue()
    lines = [ln for ln in out.split("\n") if ln]
    assert len(lines) == 2 and out.count("▀") == 8
    assert "38;2;255;0;0" in out and "48;2;255;0;0" in lines[0]  # top row: red over red
    assert "38;2;0;0;255" in lines[1] and "48;2;0;0;255" in lines[1]  # bottom row: blue over blue


def test_half_block_image_fits_the_console_width() -> None:
    buf = io.StringIO()
    Console(file=buf, width=10, force_terminal=True, color_system="truecolor").print(
        HalfBlockImage(Image.new("RGB", (200, 100)), max_width=48)
    )
    assert max(line.count("▀") for line in buf.getvalue().split("\n")) == 10
