"""Which databases use an image store, and reading another SQLite database's references without
changing it.

The image store belongs to the data directory, not to a database: the default SQLite database and a
PostgreSQL database given with ``--db`` (or several workers' databases) may share one store, and an
image file may go only when *no* session of any of them references it. So every database that opens
the store is recorded under ``<home>/images/.databases/`` (one small file each, written once: a SQLite
file's resolved path, or a PostgreSQL URL without its password or query options), and garbage
collection decides from all of them:

- another SQLite database is read, read-only, with a short busy timeout (a local file: no network, no
  credentials);
- another database server is never connected to (an entry anyone who can write the store could plant
  must not make gc connect somewhere with ``PGPASSWORD``, nor hang a gc on a server that does not
  answer), so its images are all kept;
- an entry that cannot be read, or a database file that is not there (an unmounted disk, another
  container), keeps every image too. An entry is forgotten only when asked
  (``duogen sessions gc --forget NAME``): a lost image is gone for good, a kept one costs only space.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from duogen_agents.errors import StorageError
from duogen_agents.storage.images import ImageStore, write_atomic

REGISTRY_DIR = ".databases"
UNFINISHED_SQL = "('running', 'interrupted')"  # records.UNFINISHED, in SQL


def identity(url: str) -> str:
    """What names a database in the registry: ``sqlite:////abs/path.db``, or the PostgreSQL URL with
    only its user, host, port and database (no password, no query option but a socket's host and
    port: ``sslpassword`` and the like never reach the store)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"sqlite:///{Path(u.database or '').expanduser().resolve()}"
    query = {k: v for k, v in u.query.items() if k in ("host", "port")}
    u = u.set(drivername="postgresql", query=query)
    return u._replace(password=None).render_as_string(hide_password=False)  # set() ignores a None


def _entry_file(store: ImageStore, name: str) -> Path:
    return store.images_dir / REGISTRY_DIR / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.db"


def register(store: ImageStore, url: str) -> None:
    """Record that the database at ``url`` uses ``store`` (once; later calls only look). A store this
    process cannot write to (or search) is left as it is: then nothing here writes images to it either."""
    name = identity(url)
    with contextlib.suppress(OSError, StorageError):
        path = _entry_file(store, name)
        if not path.exists():
            write_atomic(path, name.encode() + b"\n")


def registered(store: ImageStore) -> list[tuple[str | None, Path]]:
    """The databases recorded as users of ``store``: (name, its registry file); the name is None for
    an entry that cannot be read or is not one (it may stand for any database)."""
    folder = store.images_dir / REGISTRY_DIR
    try:
        if not folder.exists() and not folder.is_symlink():
            return []
        if folder.is_symlink() or not folder.is_dir():  # planted: it may stand for any database
            return [(None, folder)]
        files = sorted(folder.glob("*.db"))
    except OSError:
        return [(None, folder)]
    out: list[tuple[str | None, Path]] = []
    for f in files:
        try:
            name: str | None = f.read_text(encoding="utf-8").strip() if f.is_file() and not f.is_symlink() else None
        except (OSError, UnicodeDecodeError):
            name = None
        out.append((name if name and name.startswith(("sqlite:///", "postgresql://")) else None, f))
    return out


def forget(store: ImageStore, name: str) -> bool:
    """Drop the registry entries of the database ``name`` (a URL as gc's note prints it, or with its
    password), or the entry file ``name`` itself (gc's note names the file of an entry it cannot read):
    gc stops keeping images for it. An entry is matched by what it holds, whatever its file is called.
    Returns whether there was one."""
    try:
        wanted = {name, identity(name)}
    except Exception:  # not a database URL: perhaps an entry's file
        wanted = {name}
    dropped = False
    for entry, path in registered(store):
        if entry in wanted or str(path) == name or (entry is None and path.name == name):
            with contextlib.suppress(OSError):
                path.unlink()
                dropped = True
    return dropped


@dataclass
class ReadOnlyDatabase:
    """Another SQLite database on the same store, opened for reading only: ``rows(sql)`` runs one
    query, ``saver`` reads its checkpoints (with duogen's strict serializer)."""

    name: str
    rows: Callable[[str], list[tuple[Any, ...]]]
    saver: Any


@contextlib.contextmanager
def open_read_only(name: str) -> Iterator[ReadOnlyDatabase]:
    """Open the registered SQLite database ``name`` without writing to it (no migration, no saver
    set-up), waiting at most a few seconds for a writer's lock. Raises ``StorageError`` when it is
    not a SQLite database or its file is not there (which is no proof that it is gone)."""
    from duogen_agents.storage.serde import CheckpointSerializer

    u = make_url(name)
    if u.get_backend_name() != "sqlite":
        raise StorageError(f"{name} is on another database server; gc does not connect to it")
    path = Path(u.database or "")
    if not path.is_file():
        raise StorageError(f"its file {path} is not there (another disk, container or host?)")
    conn: Any = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5, check_same_thread=False)
    try:
        from langgraph.checkpoint.sqlite import SqliteSaver

        saver = SqliteSaver(conn, serde=CheckpointSerializer())
        saver.is_setup = True  # read only: its tables are there, or no state is read from them

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(sql).fetchall()]

        yield ReadOnlyDatabase(name, rows, saver)
    finally:
        conn.close()
