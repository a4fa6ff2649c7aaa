"""Loading user images: odd but valid files are converted, bad ones give one clear error.

Accepted and converted to 8-bit RGB: CMYK, palette (with transparency), 16-bit and float grey,
grey+alpha, EXIF-rotated photos, animated files (first frame), and extreme aspect ratios (padded to at
most ``MAX_ASPECT``:1 so vision encoders accept them). Refused with ``InputImageError``: missing or
unreadable files, non-images, truncated or corrupt data, and decompression bombs.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
        data = p.read_bytes()
    except PermissionError as e:
        raise InputImageError(f"cannot read image {name}: permission denied") from e
    except OSError as e:
        raise InputImageError(f"cannot read image {name}: {e.strerror}") from e
    return decode_image(data, name)


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Decode image bytes (any format Pillow reads) as 8-bit RGB, with the same limits and the same
    one-line errors as a file."""
    if len(data) > MAX_FILE_BYTES:
        raise InputImageError(f"{name} is {len(data) / 2**20:.0f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise InputImageError(
                        f"{name} is {im.width}x{im.height} pixels: too large (the limit is {MAX_PIXELS:,} pixels)"
                    )
                if getattr(im, "is_animated", False):
                    im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im) or im
                rgb = _to_rgb(im)
    except InputImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputImageError(f"{name} is too large to decode safely (decompression bomb?)") from e
    except UnidentifiedImageError as e:
        raise InputImageError(f"not an image file, or a format Pillow cannot read: {name}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputImageError(f"{name} is corrupt or truncated ({e})") from e
    return _fit_aspect(rgb)


# ---- LangChain standard image blocks and OpenAI image_url parts ------------------------------------

REMOTE_TIMEOUT_S = 20.0


def is_image_block(block: object) -> bool:
    return isinstance(block, dict) and block.get("type") in ("image", "image_url")


def block_file_id(block: Mapping[str, Any]) -> str | None:
    """The store id an image block names (``{"type": "image", "file_id": ...}``), else None."""
    return block.get("file_id") if block.get("type") == "image" and isinstance(block.get("file_id"), str) else None


def block_base64(block: Mapping[str, Any]) -> str | None:
    """The base64 text an image block carries (LangChain v1 ``base64``, or v0 ``source_type``
    ``base64`` with ``data``), else None."""
    if isinstance(block.get("base64"), str):
        return block["base64"]
    if block.get("source_type") == "base64" and isinstance(block.get("data"), str):
        return block["data"]
    return None


def image_from_block(block: Mapping[str, Any], *, allow_remote: bool = False, allow_files: bool = True) -> Image.Image:
    """The pixels of an image content block that carries them: LangChain v1 ``{"type": "image",
    "base64": ...}`` or ``"url"`` (``data:``, ``file://`` unless ``allow_files`` is off (a caller on
    another machine), or, only with ``allow_remote``, ``http(s)``), the v0 form ``{"source_type":
    "base64", "data": ...}``, and OpenAI ``{"type": "image_url", "image_url": {"url": ...}}``. (A
    ``file_id`` names an image of the store; the caller resolves it.)"""
    if block.get("type") == "image_url":
        inner = block.get("image_url")
        url = inner.get("url") if isinstance(inner, Mapping) else inner
        if not isinstance(url, str):
            raise InputImageError("an image_url part without a url")
        return _from_url(url, allow_remote, allow_files)
    if (data := block_base64(block)) is not None:
        return decode_image(_b64(data), "a base64 image block")
    url = block.get("url") if isinstance(block.get("url"), str) else None
    if url is None and block.get("source_type") == "url" and isinstance(block.get("data"), str):
        url = block["data"]
    if url is not None:
        return _from_url(url, allow_remote, allow_files)
    raise InputImageError("an image block with neither base64 data, a url nor a file_id")


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputImageError(f"an image block's base64 data is not valid base64 ({e})") from None


def _from_url(url: str, allow_remote: bool, allow_files: bool = True) -> Image.Image:
    scheme = url[: url.find(":") + 1].lower()  # URL schemes are case-insensitive ("HTTPS://...")
    url = scheme + url[len(scheme) :]
    if url.startswith("data:"):
        head, _, body = url.partition(",")
        if ";base64" not in head:
            raise InputImageError("a data: URL image must be base64-encoded")
        return decode_image(_b64(body), "a data: URL image")
    if url.startswith("file://"):
        if not allow_files:
            raise InputImageError(
                "refusing a file:// image URL: it would be read from this server's disk; send the pixels "
                "(base64, or a data: URL)"
            )
        from urllib.parse import unquote, urlparse

        return load_input_image(unquote(urlparse(url).path))
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise InputImageError(
                f"refusing to fetch {url[:80]}: remote images are off (Agent(..., allow_remote_images=True) "
                "turns them on)"
            )
        return decode_image(_fetch(url), url[:80])
    raise InputImageError(f"unsupported image URL {url[:80]!r}: use data:, file:// or http(s)://")


def _fetch(url: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise InputImageError(f"{url[:80]} is larger than {MAX_FILE_BYTES // 2**20} MiB")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise InputImageError(f"cannot fetch {url[:80]}: {e}") from None
