"""Odd but valid images are converted; bad ones give InputImageError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from duogen_agents import InputImageError
from duogen_agents.inputs import MAX_ASPECT, load_input_image


def _save(tmp_path, name, im, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_cmyk_jpeg(tmp_path) -> None:
    im = load_input_image(_save(tmp_path, "c.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0))))
    assert im.mode == "RGB" and im.getpixel((5, 5))[0] > 200


def test_palette_with_transparency_goes_on_white(tmp_path) -> None:
    p = Image.new("P", (40, 40), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 20, 40))
    im = load_input_image(_save(tmp_path, "p.png", p, transparency=0))
    assert im.getpixel((30, 5)) == (255, 255, 255) and im.getpixel((5, 5)) == (255, 0, 0)


def test_sixteen_bit_grey_keeps_contrast(tmp_path) -> None:
    arr = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    im = load_input_image(_save(tmp_path, "g16.png", Image.fromarray(arr)))
    px = np.asarray(im)
    assert im.mode == "RGB" and px.min() < 10 and px.max() > 245


def test_animated_gif_first_frame(tmp_path) -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = load_input_image(p).getpixel((10, 10))
    assert r > 200 and b < 50


@pytest.mark.parametrize("size", [(4000, 20), (20, 4000), (3, 3)])
def test_extreme_aspect_ratios_and_tiny_images(tmp_path, size) -> None:
    im = load_input_image(_save(tmp_path, "x.png", Image.new("RGB", size, (0, 128, 0))))
    assert max(im.size) / min(im.size) <= MAX_ASPECT + 0.01 and min(im.size) >= 32


def test_grey_alpha_and_exif_rotation(tmp_path) -> None:
    im = load_input_image(_save(tmp_path, "la.png", Image.new("LA", (40, 30), (10, 255))))
    assert im.mode == "RGB"
    rot = Image.new("RGB", (120, 60))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90
    im = load_input_image(_save(tmp_path, "r.jpg", rot, exif=exif))
    assert im.size == (60, 120)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b"hello, not an image"), "not an image"),
        (lambda p: p.write_bytes(_png_bytes()[:60]), "corrupt or truncated"),
        (lambda p: Image.new("1", (12000, 12000)).save(p), "too large"),
    ],
    ids=["missing", "not-an-image", "truncated", "bomb"],
)
def test_bad_images(tmp_path, make, match) -> None:
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(InputImageError, match=match):
        load_input_image(p)


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()
