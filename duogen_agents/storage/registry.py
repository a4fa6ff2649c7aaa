"""Which databases use an image store, and reading another one's references without changing it.

The image store belongs to the data directory, not to a database: the default SQLite database and a
PostgreSQL database given with ``--db`` (or several workers' databases) may share one store, and an
image file is kept as long as *any* of their sessions references it. So every database that opens the
store is recorded under ``<home>/images/.databases/`` (one small file each, written once: a SQLite
file's resolved path, or a PostgreSQL URL with its password left out), and garbage collection reads
them all before it removes a file. Another database is opened read-only: SQLite with ``mode=ro``,
PostgreSQL in read-only transactions (its password comes from ``PGPASSWORD`` or ``~/.pgpass``, as
for ``psql``; none is ever written to the store).
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
    """What names a database in the registry: ``sqlite:////abs/path.db``, or the PostgreSQL URL without
    its driver or password (the same database is the same name whichever password reached it)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return f"sqlite:///{Path(u.database or '').expanduser().resolve()}"
    u = u.set(drivername="postgresql").difference_update_query(["password"])
    return u._replace(password=None).render_as_string(hide_password=False)  # set() ignores a None


def _entry_file(store: ImageStore, name: str) -> Path:
    return store.images_dir / REGISTRY_DIR / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.db"


def register(store: ImageStore, url: str) -> None:
    """Record that the database at ``url`` uses ``store`` (once; later calls only look). A store this
    process cannot write to is left as it is: then nothing here writes images to it either."""
    name = identity(url)
    path = _entry_file(store, name)
    if path.exists():
        return
    with contextlib.suppress(StorageError):
        write_atomic(path, name.encode() + b"\n")


def registered(store: ImageStore) -> list[tuple[str, Path]]:
    """The databases recorded as users of ``store``: (name, its registry file)."""
    folder = store.images_dir / REGISTRY_DIR
    if folder.is_symlink() or not folder.is_dir():
        return []
    out = []
    for f in sorted(folder.glob("*.db")):
        if f.is_symlink() or not f.is_file():
            continue
        try:
            name = f.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if name.startswith(("sqlite:///", "postgresql://")):
            out.append((name, f))
    return out


def unregister(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class DatabaseGone(Exception):
    """The registered database no longer exists (its file was removed, or the server has no such
    database): it references nothing, and its registry entry can go."""


@dataclass
class ReadOnlyDatabase:
    """Another database on the same store, opened for reading only: ``rows(sql)`` runs one query,
    ``saver`` reads its checkpoints (with duogen's strict serializer)."""

    name: str
    rows: Callable[[str], list[tuple[Any, ...]]]
    saver: Any


@contextlib.contextmanager
def open_read_only(name: str) -> Iterator[ReadOnlyDatabase]:
    """Open the registered database ``name`` without writing to it (no migration, no saver set-up).
    Raises ``DatabaseGone`` when it no longer exists; any other failure propagates."""
    from duogen_agents.storage.serde import CheckpointSerializer

    u = make_url(name)
    if u.get_backend_name() == "sqlite":
        path = Path(u.database or "")
        if not path.is_file():
            raise DatabaseGone(name)
        conn: Any = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False)
        try:
            from langgraph.checkpoint.sqlite import SqliteSaver

            saver = SqliteSaver(conn, serde=CheckpointSerializer())
            saver.is_setup = True  # read only: its tables are there, or no state is read from them

            def rows(sql: str) -> list[tuple[Any, ...]]:
                return [tuple(r) for r in conn.execute(sql).fetchall()]

            yield ReadOnlyDatabase(name, rows, saver)
        finally:
            conn.close()
        return
    import psycopg
    from psycopg.rows import dict_row, tuple_row

    try:
        conn = psycopg.connect(
            name,
            autocommit=True,
            prepare_threshold=0,
            row_factory=dict_row,
            connect_timeout=10,
            options="-c default_transaction_read_only=on",
        )
    except psycopg.OperationalError as e:
        if 'database "' in str(e) and "does not exist" in str(e):
            raise DatabaseGone(name) from None
        raise
    try:
        from langgraph.checkpoint.postgres import PostgresSaver

        saver = PostgresSaver(conn, serde=CheckpointSerializer())

        def pg_rows(sql: str) -> list[tuple[Any, ...]]:
            with conn.cursor(row_factory=tuple_row) as cur:
                return list(cur.execute(sql).fetchall())

        yield ReadOnlyDatabase(name, pg_rows, saver)
    finally:
        conn.close()
