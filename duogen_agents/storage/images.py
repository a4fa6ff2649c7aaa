"""Content-addressed PNG store: ``<home>/images/<aa>/<sha256>.png``.

Writes are atomic (temporary file, then ``os.replace``), so a crash never leaves a half-written image
under its final name, and storing the same pixels twice is free.

Reads treat the store as untrusted input, like an upload: a file larger than any PNG duogen writes at
``MAX_PIXELS`` (``MAX_STORED_BYTES``) is refused before it is read, a file whose bytes do not hash to
its id, or that is not a PNG, or whose header declares more than ``MAX_PIXELS`` pixels, is refused
before it is decoded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import re
import secrets
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from duogen_agents.document import SHORT_ID_LENGTH, ImageRef
from duogen_agents.errors import StorageError
from duogen_agents.inputs import MAX_PIXELS
from duogen_agents.storage.locks import flocked, open_lock_file, try_flock

LEASE_MARGIN_S = 2.0
STALE_TMP_LEASE_S = 60.0
IMAGE_ID = re.compile(r"[0-9a-f]{64}")
# The largest file a stored image may be: no PNG that ``encode_png`` writes at ``MAX_PIXELS`` comes
# near it. Its raw scanlines are at most 5 bytes a pixel (4 channels of RGBA, the widest mode it keeps,
# plus one filter byte a row, and a row is at least one pixel); zlib grows incompressible data by at
# most ~0.03% (``deflateBound``), each IDAT chunk (64 KiB or more) adds 12 bytes, and the header and
# IEND under a KiB. 1% over 5 bytes a pixel covers all of that: ~202 MB at 40 M pixels, where a
# replaced file of any size was read whole into memory before.
MAX_STORED_BYTES = MAX_PIXELS * 5 * 101 // 100


def is_image_id(value: object) -> bool:
    """Whether ``value`` is a full image id (64 lowercase hex digits), the only form that becomes a path."""
    return isinstance(value, str) and IMAGE_ID.fullmatch(value) is not None


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


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
)


def replaceable(path: Path) -> os.stat_result | None:
    """The ``lstat`` of ``path`` if it is a regular file, ``None`` if nothing is there; anything else
    (a symlink, a FIFO, a device, a folder) raises ``StorageError``: an export never replaces it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
    if stat.S_ISREG(st.st_mode):
        return st
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise StorageError(f"{path} is {kind}; refusing to replace it with a regular file")


def no_space_message(path: Path | str) -> str:
    return f"no space left on the device holding {path}; free some space and try again"


def write_atomic(path: Path | str, data: bytes) -> Path:
    """Write one file atomically (temporary file in the same folder, fsync, then ``os.replace``), so a
    crash never leaves a half-written file under its final name.

    Only a regular file is ever replaced (see ``replaceable``); a new file gets the mode the umask
    gives (0644 under the usual 022), a replaced one keeps its mode."""
    target = Path(path)
    old = replaceable(target)
    mode = stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~current_umask()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StorageError(no_space_message(target.parent)) from e
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
        """The file of one image. Ids come from storage, which is untrusted: anything but a sha256,
        or a path that leads out of the store (a symlinked subfolder), raises ``StorageError``."""
        if not is_image_id(image_id):
            shown = repr(image_id)[:80]
            raise StorageError(f"invalid image id {shown}: not a sha256 (a stored record was changed outside duogen)")
        p = self.images_dir / image_id[:2] / f"{image_id}.png"
        if p.parent.is_symlink() or p.is_symlink():
            if not p.resolve().is_relative_to(self.images_dir.resolve()):
                raise StorageError(f"{p} leads outside the image store {self.images_dir}; refusing to use it")
        return p

    def put(self, image: Image.Image) -> ImageRef:
        if image.width * image.height > MAX_PIXELS:  # reads refuse it: never store what cannot be read back
            raise StorageError(
                f"a {image.width}x{image.height} image is more than the store keeps (the limit is {MAX_PIXELS:,} pixels)"
            )
        data = encode_png(image)
        image_id = hashlib.sha256(data).hexdigest()
        target = self.path(image_id)
        # Under the store's shared lock, so that ``gc`` (exclusive) never deletes a file between our
        # check and its use. A file that is there already is touched: a running turn just used it.
        with flocked(self._store_lock, shared=True):
            try:
                os.utime(target)
            except FileNotFoundError:
                write_atomic(target, data)
        return ImageRef(id=image_id, width=image.width, height=image.height)

    # ---- what garbage collection must keep ------------------------------------------------------

    @property
    def _store_lock(self) -> Path:
        return self.images_dir / ".locks" / "store.lock"

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Declare that this process is writing images from now until the block ends (a turn):
        ``collecting`` keeps every file at least as new as the oldest live lease. The lease is a
        locked file, so a crashed process's lease is recognised as stale and dropped. It is locked
        and written under a temporary name first, so gc never sees it unlocked."""
        leases = self.images_dir / ".locks" / "leases"
        token = f"{os.getpid()}-{secrets.token_hex(6)}"
        tmp, path = leases / f".{token}.tmp", leases / f"{token}.lease"
        fd = open_lock_file(tmp)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Timestamps of files lag the clock by up to a tick: start the lease a little early.
            os.write(fd, repr(time.time() - LEASE_MARGIN_S).encode())
            os.rename(tmp, path)
            yield
        finally:
            for p in (path, tmp):
                with contextlib.suppress(OSError):
                    p.unlink()
            os.close(fd)

    def _oldest_lease(self) -> float | None:
        """Start time of the oldest live lease; stale ones (their process died) are removed."""
        leases = self.images_dir / ".locks" / "leases"
        oldest: float | None = None
        if not leases.is_dir():
            return None
        for f in leases.glob(".*.tmp"):  # a lease whose process died before it was in place
            with contextlib.suppress(OSError, StorageError):
                if time.time() - f.stat().st_mtime > STALE_TMP_LEASE_S:
                    fd = open_lock_file(f, create=False)
                    try:
                        if try_flock(fd, fcntl.LOCK_EX):
                            f.unlink()
                    finally:
                        os.close(fd)
        for f in leases.glob("*.lease"):
            try:
                fd = open_lock_file(f, create=False)
            except StorageError:
                continue
            try:
                if try_flock(fd, fcntl.LOCK_SH):
                    with contextlib.suppress(OSError):
                        f.unlink()
                    continue
                try:
                    started = float(os.pread(fd, 64, 0).decode() or "nan")
                except ValueError:
                    started = float("nan")
                if started != started:  # written a moment ago, content not there yet
                    started = time.time() - LEASE_MARGIN_S
                oldest = started if oldest is None else min(oldest, started)
            finally:
                os.close(fd)
        return oldest

    @contextlib.contextmanager
    def collecting(self, grace_seconds: float) -> Iterator[float]:
        """Hold the store still (no ``put`` runs) and yield the cut-off time: files modified after it
        must be kept. It is the earliest of now minus ``grace_seconds``, this moment (so that a turn
        starting while we look is safe), and the start of the oldest live lease."""
        with flocked(self._store_lock):
            now = time.time()
            cutoff = min(now - max(0.0, grace_seconds), now)
            oldest = self._oldest_lease()
            if oldest is not None:
                cutoff = min(cutoff, oldest)
            yield cutoff

    def _read(self, image_id: str) -> bytes:
        """The bytes of one stored image, checked. The store is untrusted too (a shared folder, a
        restored backup): only a regular file is read (never through a symlink, never blocking on a
        FIFO), only up to ``MAX_STORED_BYTES`` (its size is taken from the open file before reading),
        and only bytes that hash to the image's id, hold a PNG, and declare at most ``MAX_PIXELS``
        pixels are returned. The hash costs ~1.5 ms for a 704x1280 PNG of noise (2.7 MB), a tenth of
        decoding it (~13 ms), and it makes exports and the HTML's base64 copies checked too."""
        p = self.path(image_id)
        short = image_id[:SHORT_ID_LENGTH]
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StorageError(f"image {short} is missing from the store at {p}") from None
        except OSError as e:
            raise StorageError(f"cannot read image {short} at {p}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"image {short} at {p} is not a regular file")
            if st.st_size > MAX_STORED_BYTES:
                raise StorageError(
                    f"image {short} at {p} is {st.st_size / 2**20:.0f} MiB, larger than any image duogen stores "
                    f"(the limit is {MAX_STORED_BYTES / 2**20:.0f} MiB); it was changed outside duogen, so it was "
                    "not read"
                )
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(MAX_STORED_BYTES + 1)  # the file may grow after fstat
        finally:
            os.close(fd)
        if len(data) > MAX_STORED_BYTES or hashlib.sha256(data).hexdigest() != image_id:
            raise StorageError(
                f"image {short} in the store is damaged: its bytes do not match its id (sha256); it was changed "
                "outside duogen"
            )
        self._header(image_id, data)
        return data

    @staticmethod
    def _header(image_id: str, data: bytes) -> tuple[int, int]:
        """The size a stored PNG declares, read from its header without decoding it; more than
        ``MAX_PIXELS`` (the cap on uploads) is refused, so a small file that would inflate to
        gigabytes (a 13000x13000 PNG is 164 KB on disk) is never decoded."""
        short = image_id[:SHORT_ID_LENGTH]
        try:
            # Pillow warns from ~89 M pixels: the stricter check below refuses those with its own line.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                    width, height = im.size
        except UnidentifiedImageError:
            raise StorageError(f"image {short} in the store is not a PNG; it was changed outside duogen") from None
        except Image.DecompressionBombError as e:
            raise StorageError(f"image {short} in the store is too large to decode safely ({e})") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise StorageError(f"image {short} in the store is damaged ({e})") from None
        if width * height > MAX_PIXELS:
            raise StorageError(
                f"image {short} in the store is {width}x{height} pixels, more than duogen accepts (the limit is "
                f"{MAX_PIXELS:,} pixels); it was changed outside duogen, so it was not decoded"
            )
        return width, height

    def open(self, ref: ImageRef | str) -> Image.Image:
        image_id = ref.id if isinstance(ref, ImageRef) else ref
        data = self._read(image_id)
        try:
            # Pillow's own bomb check warns (it does not refuse) between its two limits: an error here.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                    im.load()
                    return im.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise StorageError(
                f"image {image_id[:SHORT_ID_LENGTH]} in the store is too large to decode safely ({e})"
            ) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise StorageError(f"image {image_id[:SHORT_ID_LENGTH]} in the store is damaged ({e})") from None

    def ref(self, image_id: str) -> ImageRef:
        """The ``ImageRef`` of a stored image (its size read from the PNG header, no decoding)."""
        width, height = self._header(image_id, self._read(image_id))
        return ImageRef(id=image_id, width=width, height=height)

    def read_bytes(self, ref: ImageRef | str) -> bytes:
        return self._read(ref.id if isinstance(ref, ImageRef) else ref)

    def find(self, short: str) -> ImageRef | None:
        """The stored image whose id starts with ``short`` (12 or more hex digits), if exactly one."""
        if not (SHORT_ID_LENGTH <= len(short) <= 64 and re.fullmatch(r"[0-9a-f]+", short)):
            return None
        folder = self.images_dir / short[:2]
        if folder.is_symlink() or not folder.is_dir():
            return None
        hits = [f.stem for f in folder.glob(f"{short}*.png") if is_image_id(f.stem) and not f.is_symlink()]
        return self.ref(hits[0]) if len(hits) == 1 else None

    def exists(self, image_id: str) -> bool:
        return self.path(image_id).exists()

    def iter_files(self) -> list[tuple[str, Path]]:
        """Every stored image as (id, path), and leftover temporary files as ("", path)."""
        out: list[tuple[str, Path]] = []
        if not self.images_dir.is_dir():
            return out
        for sub in sorted(self.images_dir.iterdir()):
            # Only the store's own two-hex-digit folders (not .locks, not a symlink to elsewhere).
            if len(sub.name) != 2 or sub.is_symlink() or not sub.is_dir():
                continue
            for f in sorted(sub.iterdir()):
                if f.is_symlink():
                    continue
                if f.name.startswith(".tmp-"):
                    out.append(("", f))
                elif f.suffix == ".png" and is_image_id(f.stem) and f.stem[:2] == sub.name:
                    out.append((f.stem, f))
        return out

    def remove(self, image_id: str, *, older_than: float | None = None) -> int:
        """Delete one image file; returns the bytes freed (0 if it was not there, or, with
        ``older_than``, if it was modified after that time: a running turn may be using it)."""
        p = self.path(image_id)
        try:
            st = p.stat()
            if older_than is not None and st.st_mtime > older_than:
                return 0
            p.unlink()
        except FileNotFoundError:
            return 0
        return st.st_size
