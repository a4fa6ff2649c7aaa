"""Loading user images: odd but valid files are converted, bad ones give one clear error.

Accepted and converted to 8-bit RGB: CMYK, palette (with transparency), 16-bit and float grey,
grey+alpha, EXIF-rotated photos, animated files (first frame), and extreme aspect ratios (padded to at
most ``MAX_ASPECT``:1 so vision encoders accept them). Refused with ``InputImageError``: missing or
unreadable files, non-images, truncated or corrupt data, and decompression bombs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from duogen_agents.errors import InputImageError

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000  # ~ 7000 x 5700; larger is refused as a possible decompression bomb
MAX_ASPECT = 8.0
MIN_SIDE = 32


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale the real range into 8 bits instead of clipping (16-bit PNGs otherwise turn white).
        im = im.convert("F") if im.mode != "F" else im
        lo, hi = im.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        im = im.point(lambda v: (v - lo) * scale).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def _fit_aspect(im: Image.Image) -> Image.Image:
    w, h = im.size
    if max(w, h) / min(w, h) > MAX_ASPECT:
        # Pad (never crop: the user's content stays whole) to the largest accepted ratio.
        if w > h:
            canvas = Image.new("RGB", (w, int(w / MAX_ASPECT + 0.5)), (255, 255, 255))
        else:
            canvas = Image.new("RGB", (int(h / MAX_ASPECT + 0.5), h), (255, 255, 255))
        canvas.paste(im, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        im = canvas
    if min(im.size) < MIN_SIDE:
        factor = MIN_SIDE / min(im.size)
        im = im.resize((max(MIN_SIDE, round(im.width * factor)), max(MIN_SIDE, round(im.height * factor))))
    return im


def load_input_image(path: Path | str) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image, or raise ``InputImageError`` with one clear line."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise InputImageError(f"image not found: {name}")
    if not p.is_file():
        raise InputImageError(f"not a file: {name}")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InputImageError(f"cannot read image {name}: {e.strerror}") from e
    if size > MAX_FILE_BYTES:
        raise InputImageError(f"image {name} is {size / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise InputImageError(
                        f"image {name} is {im.width}x{im.height} pixels: too large (the limit is {MAX_PIXELS:,} pixels)"
                    )
                if getattr(im, "is_animated", False):
                    im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im) or im
                rgb = _to_rgb(im)
    except InputImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputImageError(f"image {name} is too large to decode safely (decompression bomb?)") from e
    except UnidentifiedImageError as e:
        raise InputImageError(f"not an image file, or a format Pillow cannot read: {name}") from e
    except PermissionError as e:
        raise InputImageError(f"cannot read image {name}: permission denied") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputImageError(f"image {name} is corrupt or truncated ({e})") from e
    return _fit_aspect(rgb)
