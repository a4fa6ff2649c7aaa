"""Stored images are untrusted input too: a file replaced in the store (a shared folder, a restored
backup) is refused before it is read whole or decoded, with one line naming the image."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from duogen_agents.cli import main
from duogen_agents.errors import StorageError
from duogen_agents.inputs import MAX_PIXELS
from duogen_agents.storage.database import Database
from duogen_agents.storage.images import MAX_STORED_BYTES, ImageStore, encode_png
from tests.security.helpers import DONE, OK, TEXT, image, make_session, one_line, scripted_agent

# Just over the cap on uploads (41 M pixels), yet 40 KB on disk: it would inflate to 41 MB, 123 MB as RGB.
BOMB_SIDE = 6400


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (BOMB_SIDE, BOMB_SIDE)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _plant(store: ImageStore, data: bytes, image_id: str | None = None) -> str:
    image_id = image_id or hashlib.sha256(data).hexdigest()
    path = store.path(image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return image_id


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any PNG's pixel data is decoded (the header may be read)."""
    from PIL import ImageFile

    def refuse(self, *a, **k):
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_a_stored_png_over_max_pixels_is_refused_from_its_header(home, no_decoding) -> None:
    store = ImageStore(home)
    data = _bomb()
    assert len(data) < 100_000 and BOMB_SIDE**2 > MAX_PIXELS
    bomb = _plant(store, data)  # under its own sha256: the content check passes, the pixel check must not
    for call in (store.open, store.ref, store.read_bytes):
        with pytest.raises(StorageError) as e:
            call(bomb)
        line = str(e.value)
        assert bomb[:12] in line and f"{BOMB_SIDE}x{BOMB_SIDE} pixels" in line and f"{MAX_PIXELS:,}" in line


def test_a_stored_file_larger_than_any_png_duogen_writes_is_not_read(home, monkeypatch) -> None:
    store = ImageStore(home)
    big = "ab" * 32
    path = store.path(big)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(MAX_STORED_BYTES + 1)  # sparse: no disk space used
    reads = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: reads.append(a) or real_fdopen(*a, **k))
    for call in (store.open, store.read_bytes):
        with pytest.raises(StorageError, match=f"image {big[:12]} .* larger than any image duogen stores"):
            call(big)
    assert reads == []  # refused from fstat, before a byte was read


def test_bytes_that_do_not_match_the_id_are_refused(home) -> None:
    store = ImageStore(home)
    ref = store.put(Image.new("RGB", (64, 48), (200, 30, 30)))
    store.path(ref.id).write_bytes(encode_png(Image.new("RGB", (64, 48), (0, 0, 255))))  # a valid, other PNG
    for call in (store.open, store.ref, store.read_bytes):
        with pytest.raises(StorageError, match=f"image {ref.id[:12]} .*do not match its id"):
            call(ref.id)


def test_a_stored_file_that_is_not_a_png_is_refused(home) -> None:
    store = ImageStore(home)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="GIF")
    gif = _plant(store, buf.getvalue())
    with pytest.raises(StorageError, match=f"image {gif[:12]} in the store is not a PNG"):
        store.open(gif)


def test_pillows_bomb_warning_is_an_error(home, monkeypatch) -> None:
    """A limit lowered in Pillow (``Image.MAX_IMAGE_PIXELS``) is honoured: its warning refuses, never prints."""
    store = ImageStore(home)
    ref = store.put(Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # warns from 6,000 pixels, refuses from 12,000
    with pytest.raises(StorageError, match=f"image {ref.id[:12]} in the store is too large to decode safely"):
        store.open(ref)


def test_the_size_cap_holds_for_the_worst_pngs_duogen_writes() -> None:
    """``MAX_STORED_BYTES`` is 5.05 bytes a pixel: incompressible RGBA in one-pixel rows (the most
    filter bytes) comes closest; RGB noise and real pictures stay far below."""
    rng = np.random.default_rng(0)
    per_pixel = MAX_STORED_BYTES / MAX_PIXELS
    for shape, mode in [((200_000, 1, 4), "RGBA"), ((500, 400, 4), "RGBA"), ((1280, 704, 3), "RGB")]:
        im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        size = len(encode_png(im))
        assert size / (im.width * im.height) < per_pixel, (shape, size)
    normal = len(encode_png(Image.new("RGB", (1280, 704), (90, 140, 60))))
    assert normal < 1280 * 704 * 3 // 10


def test_a_follow_up_turn_refuses_a_replaced_image(db_url, home, capsys) -> None:
    """The audit's case: the session's image replaced by a PNG of 41 M pixels under the same name."""
    doc = make_session(db_url, home, "base")
    store = ImageStore(home)
    victim = doc.images[0].image.id
    store.path(victim).write_bytes(_bomb())

    agent = scripted_agent(home, [TEXT, image("again", [victim[:12]], "edit"), OK, DONE])
    with Database.open(db_url, home=home) as db, pytest.raises(StorageError) as e:
        agent.session("base", database=db).send("Redraw it in blue")
    assert victim[:12] in str(e.value) and "do not match its id" in str(e.value)

    code = main(["sessions", "export", "base", "--format", "html", "--out", str(home / "base.html"), "--db", db_url])
    line = one_line(capsys.readouterr().err)
    assert code == 1 and victim[:12] in line and "internal error" not in line
    assert not (home / "base.html").exists()
