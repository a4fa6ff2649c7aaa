"""An image server's answer is untrusted input, like an upload: its pixel count is held to
``inputs.MAX_PIXELS`` before anything is decoded, and a picture of another size than asked is fitted
to the canvas (a 7100x7100 answer was stored, then refused on every read as "changed outside duogen";
a 13x300 answer to a 64x48 request was kept as it was)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from duogen_agents.errors import GenerationError, StorageError
from duogen_agents.inputs import MAX_PIXELS
from duogen_agents.models.images.remote import OpenAIImagesTool
from duogen_agents.presets import ImageSpec
from duogen_agents.storage.images import ImageStore


def _png(size: tuple[int, int], color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _claiming(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` (what a decompression bomb does: a
    few bytes that would inflate to gigabytes)."""
    data = bytearray(_png((8, 8)))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), then width and height
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture(scope="module")
def serve():
    """A local image server (over HTTP, through the openai client) answering every request with the
    PNG ``serve`` is called with; returns the tool."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers: list[bytes] = [b""]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = json.dumps({"created": 0, "data": [{"b64_json": base64.b64encode(answers[0]).decode()}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    spec = ImageSpec(backend="openai-images", base_url=url, model="m", width=64, height=48, max_retries=0)
    tool = OpenAIImagesTool.from_spec(spec)

    def answering(png: bytes) -> OpenAIImagesTool:
        answers[0] = png
        return tool

    yield answering
    server.shutdown()
    server.server_close()


def test_an_answer_over_max_pixels_is_refused_before_decoding(serve) -> None:
    side = int(MAX_PIXELS**0.5) + 10
    with pytest.raises(GenerationError, match=rf"sent a {side}x{side} image, more than duogen accepts"):
        serve(_claiming(side, side)).draw("a pot")
    for width, height in ((10000, 10000), (15000, 15000)):  # past Pillow's own warning, and its error
        with pytest.raises(GenerationError, match="sent an image too large to decode safely"):
            serve(_claiming(width, height)).draw("a pot")


def test_an_answer_of_another_size_is_fitted_to_the_canvas(serve) -> None:
    drawing = serve(_png((13, 300))).draw("a pot")
    assert drawing.image.size == (64, 48) and drawing.details["served_size"] == [13, 300]
    exact = serve(_png((64, 48))).draw("a pot")
    assert exact.image.size == (64, 48) and "served_size" not in exact.details


def test_the_store_never_keeps_what_it_would_refuse_to_read(tmp_path) -> None:
    store = ImageStore(tmp_path)
    big = Image.new("L", (MAX_PIXELS // 1000 + 1, 1000))
    with pytest.raises(StorageError, match="more than the store keeps"):
        store.put(big)
    assert not list(tmp_path.rglob("*.png"))
