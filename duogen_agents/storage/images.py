"""Content-addressed PNG store: ``<home>/images/<aa>/<sha256>.png``.

Writes are atomic (temporary file, then ``os.replace``), so a crash never leaves a half-written image
under its final name, and storing the same pixels twice is free.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from duogen_agents.document import SHORT_ID_LENGTH, ImageRef
from duogen_agents.errors import StorageError


def default_home() -> Path:
    """The data directory: ``$DUOGEN_HOME``, else ``$XDG_DATA_HOME/duogen``, else ``~/.local/share/duogen``."""
    if env := os.environ.get("DUOGEN_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "duogen"


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes (no metadata), so equal pixels give an equal id."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_atomic(path: Path | str, data: bytes) -> Path:
    """Write one file atomically (temporary file in the same folder, fsync, then ``os.replace``), so a
    crash never leaves a half-written file under its final name."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise StorageError(f"cannot write {target}: {e.strerror or e}") from e
    return target


class ImageStore:
    """Images by sha256 under ``root/images``.

    >>> store = ImageStore(tmp_path)                 # doctest: +SKIP
    >>> ref = store.put(Image.new("RGB", (8, 8)))    # doctest: +SKIP
    >>> store.open(ref).size                         # doctest: +SKIP
    (8, 8)
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"

    def path(self, image_id: str) -> Path:
        return self.images_dir / image_id[:2] / f"{image_id}.png"

    def put(self, image: Image.Image) -> ImageRef:
        data = encode_png(image)
        image_id = hashlib.sha256(data).hexdigest()
        target = self.path(image_id)
        if not target.exists():
            write_atomic(target, data)
        return ImageRef(id=image_id, width=image.width, height=image.height)

    def open(self, ref: ImageRef | str) -> Image.Image:
        image_id = ref.id if isinstance(ref, ImageRef) else ref
        p = self.path(image_id)
        try:
            with Image.open(p) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError as e:
            raise StorageError(f"image {image_id[:SHORT_ID_LENGTH]} is missing from the store at {p}") from e

    def read_bytes(self, ref: ImageRef | str) -> bytes:
        image_id = ref.id if isinstance(ref, ImageRef) else ref
        try:
            return self.path(image_id).read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"image {image_id[:SHORT_ID_LENGTH]} is missing from the store") from e

    def exists(self, image_id: str) -> bool:
        return self.path(image_id).exists()

    def iter_files(self) -> list[tuple[str, Path]]:
        """Every stored image as (id, path), and leftover temporary files as ("", path)."""
        out: list[tuple[str, Path]] = []
        if not self.images_dir.is_dir():
            return out
        for sub in sorted(self.images_dir.iterdir()):
            if not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if f.name.startswith(".tmp-"):
                    out.append(("", f))
                elif f.suffix == ".png" and len(f.stem) == 64:
                    out.append((f.stem, f))
        return out

    def remove(self, image_id: str) -> int:
        """Delete one image file; returns the bytes freed (0 if it was not there)."""
        p = self.path(image_id)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size
