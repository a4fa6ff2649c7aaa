"""Archive operations on stored sessions: export, fork, delete and garbage-collect the image store.

None loads a model. ``Sessions`` exposes each as a method (``sessions.fork(...)``); they live here so
the repository of records stays small.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, select, text, type_coerce
from sqlalchemy import delete as sql_delete

from duogen_agents.errors import (
    ConfigError,
    SessionExistsError,
    SessionNotFoundError,
    SessionStateError,
    StorageError,
)
from duogen_agents.storage.database import _first_line, _redact, check_session_id
from duogen_agents.storage.images import LEASE_MARGIN_S, is_image_id, replaceable
from duogen_agents.storage.records import UNFINISHED, ArtifactRecord, BlockRecord, SessionRecord, TurnRecord, utcnow
from duogen_agents.storage.registry import UNFINISHED_SQL, identity, open_read_only, registered

if TYPE_CHECKING:
    from sqlalchemy.orm import Session as OrmSession

    from duogen_agents.sessions.repository import GcReport, SessionInfo, Sessions
    from duogen_agents.storage.database import Database


def export(sessions: Sessions, session_id: str, fmt: str, out: Path | str | None) -> str | Path:
    """Export as ``html`` (self-contained), ``md`` (images copied beside it) or ``json``.
    With ``out=None`` returns the text instead of writing a file, else the path written. ``out`` may be a folder (an
    existing one, or any path ending in ``/``): the file is then ``<out>/<session_id>.<fmt>``.
    Only a regular file is ever replaced, keeping its mode."""
    from duogen_agents.export import to_html, to_json, to_markdown, write_atomic

    if fmt not in ("html", "md", "json"):
        raise ConfigError(f"unknown export format {fmt!r}; choose html, md or json")
    if out is not None:
        folder = str(out).endswith(("/", os.sep)) or Path(out).is_dir()
        out = Path(out) / f"{session_id}.{fmt}" if folder else Path(out)
        replaceable(out)  # refuse a FIFO, device or symlink before doing the work
        _not_storage(sessions, out)
        if fmt == "md":
            _not_storage(sessions, out.parent / f"{out.stem}.images" / "x.png")
    doc = sessions.document(session_id)
    if fmt == "html":
        body = to_html(doc, sessions.store)
    elif fmt == "json":
        body = to_json(doc)
    else:
        if out is None:
            body = to_markdown(doc, link=lambda ref: str(sessions.store.path(ref.id)))
        else:
            image_dir = f"{out.stem}.images"
            if (out.parent / image_dir).is_symlink():  # the pictures would land wherever it points
                raise StorageError(f"{out.parent / image_dir} is a symbolic link; refusing to write images through it")
            body = to_markdown(doc, image_dir)
            for b in doc.images:  # every picture read (and checked) before any is written: a missing
                sessions.store.read_bytes(b.image)  # one leaves no half-written export behind
            for b in doc.images:
                write_atomic(out.parent / image_dir / b.image.filename, sessions.store.read_bytes(b.image))
    if out is None:
        return body
    return write_atomic(out, body.encode())


def _not_storage(sessions: Sessions, out: Path) -> None:
    """Refuse an export target that is the session database (or a file SQLite keeps beside it) or in
    the image store: writing there would replace every session, or a picture, with the export."""
    target = out.expanduser().resolve()
    db = getattr(sessions.db, "path", None)
    if db is not None:
        beside = [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
        if target in beside or target.is_relative_to(db.with_name(db.name + ".locks")):
            raise ConfigError(f"--out {out} is the session database {db} (or its own file); choose another file")
    store = sessions.store.images_dir.expanduser().resolve()
    if target.is_relative_to(store):
        raise ConfigError(f"--out {out} is inside the image store {store}; choose a file outside it")


# ---- changing -------------------------------------------------------------------------------


def fork(sessions: Sessions, session_id: str, new_id: str | None = None, *, wait: float | None = None) -> SessionInfo:
    """Copy a session (records and graph state) under a new id; the two then diverge. ``wait``:
    seconds to wait for a turn that is writing the session (None: fail at once as busy)."""
    sessions.get(session_id)
    new_id = check_session_id(new_id) if new_id is not None else f"{session_id[:50]}-{secrets.token_hex(3)}"
    if new_id == session_id:  # before the locks: the second would wait for the first, held by this process
        raise SessionExistsError(f"a session {new_id!r} exists already (it is the one to fork); choose another id")
    sessions.db.saver  # noqa: B018 -- its tables exist before _copy_records' transaction (clear_checkpoints)
    with sessions.db.lock(session_id, wait=wait):
        if sessions.get(session_id).pending:  # read under the lock: a turn may have started or died
            raise SessionStateError(
                f"session {session_id!r} has an unfinished turn; resume or cancel it before forking"
            )
        with sessions.db.lock(new_id):
            if sessions.exists(new_id):
                raise SessionExistsError(f"a session {new_id!r} exists already; choose another id")
            _copy_records(sessions, session_id, new_id)
            try:
                values = sessions.state(session_id)
                if values:
                    sessions.state_reader.update_state(
                        {"configurable": {"thread_id": new_id}}, values, as_node="finish"
                    )
            except BaseException:
                _delete_rows(sessions, new_id)
                raise
    return sessions.get(new_id)


def _copy_records(sessions: Sessions, src_id: str, new_id: str) -> None:
    from duogen_agents.sessions.repository import _decoding

    with sessions.db.transaction() as s:
        clear_checkpoints(sessions.db, s, new_id)  # the copy never inherits state left under its id
        with _decoding(src_id):  # stored values are untrusted: a malformed one is one line, not a traceback
            _copy_rows(s, src_id, new_id)


def _copy_rows(s: OrmSession, src_id: str, new_id: str) -> None:
    src = s.get(SessionRecord, src_id)
    assert src is not None
    now = utcnow()
    dst = SessionRecord(
        id=new_id,
        title=src.title,
        preset=src.preset,
        mode=src.mode,
        parent_id=src_id,
        created_at=now,
        updated_at=now,
    )
    s.add(dst)
    turn_map: dict[int, TurnRecord] = {}
    for t in src.turns:
        nt = TurnRecord(
            session_id=new_id,
            number=t.number,
            prompt=t.prompt,
            mode=t.mode,
            preset=t.preset,
            seed=t.seed,
            status=t.status,
            stop_reason=t.stop_reason,
            error=t.error,
            title=t.title,
            base_checkpoint_id=None,
            inputs=t.inputs,
            created_at=t.created_at,
            finished_at=t.finished_at,
        )
        nt.blocks = [
            BlockRecord(position=b.position, type=b.type, text=b.text, image_sha256=b.image_sha256, data=b.data)
            for b in t.blocks
        ]
        s.add(nt)
        turn_map[t.id] = nt
    s.flush()
    for a in src.artifacts:
        s.add(
            ArtifactRecord(
                session_id=new_id,
                turn_id=turn_map[a.turn_id].id if a.turn_id in turn_map else None,
                sha256=a.sha256,
                mime=a.mime,
                size=a.size,
                width=a.width,
                height=a.height,
                origin=a.origin,
                parent_sha256=a.parent_sha256,
                request=a.request,
                created_at=a.created_at,
            )
        )


def _delete_rows(sessions: Sessions, session_id: str) -> None:
    """Delete the session's records and its checkpoints in one transaction: a failure leaves the
    whole session, never records without state or state without records. The session row goes by id
    alone (the database cascades to turns, blocks and artifacts), so a malformed stored value in it
    does not stand in the way."""
    with sessions.db.transaction() as s:
        clear_checkpoints(sessions.db, s, session_id)
        s.execute(sql_delete(SessionRecord).where(SessionRecord.id == session_id))


# The tables in which each LangGraph saver keeps a thread's checkpoints, as its ``delete_thread``
# deletes them. They live in the same database as the records, so one transaction covers both.
CHECKPOINT_TABLES = {
    "sqlite": ("checkpoints", "writes"),
    "postgresql": ("checkpoints", "checkpoint_blobs", "checkpoint_writes"),
}


def clear_checkpoints(db: Database, s: OrmSession, thread_id: str) -> None:
    """Delete a thread's checkpoints inside the records' transaction ``s``. Touch ``db.saver``
    before opening ``s``: the saver creates its tables on first use, and on SQLite that set-up would
    wait for this very transaction."""
    for table in CHECKPOINT_TABLES[db.backend]:
        s.execute(text(f"DELETE FROM {table} WHERE thread_id = :t"), {"t": thread_id})


def delete(sessions: Sessions, session_id: str, *, wait: float | None = None, notes: list[str] | None = None) -> int:
    """Delete the session's records, its checkpoints, and the image files no other session
    references (in this database or any other database that shares the image store). Returns the
    number of image files removed.

    Everything is read before anything is deleted, and the records and checkpoints go in one
    transaction, so a failure leaves the whole session or none of it. Reading never fails the
    delete: an unfinished turn whose state cannot be read keeps every file written since it began;
    another database that cannot be read keeps every image, and a line saying so goes to ``notes``."""
    check_session_id(session_id)
    if not _session_exists(sessions, session_id):  # before the lock: an unknown id never waits
        raise _not_found(session_id)
    sessions.db.saver  # noqa: B018 -- its tables exist before the transactions below (see clear_checkpoints)
    with sessions.db.lock(session_id, wait=wait):
        with sessions.store.collecting(0.0) as cutoff:
            with sessions.db.transaction() as s:
                if s.scalar(select(SessionRecord.id).where(SessionRecord.id == session_id)) is None:
                    raise _not_found(session_id)  # deleted while we waited for the lock
                shas = set(s.scalars(select(ArtifactRecord.sha256).where(ArtifactRecord.session_id == session_id)))
            kept = _references(sessions, exclude=session_id)
            _delete_rows(sessions, session_id)
            if kept.note is not None:
                if notes is not None:
                    notes.append(kept.note)
                return 0
            removed = 0
            # Only well-formed ids name a file of the store; a tampered row names nothing to remove.
            for sha in sorted({sha for sha in shas if is_image_id(sha)} - kept.ids):
                if sessions.store.remove(sha, older_than=min(cutoff, kept.since)):
                    removed += 1
            return removed


def _session_exists(sessions: Sessions, session_id: str) -> bool:
    with sessions.db.transaction() as s:
        return s.scalar(select(SessionRecord.id).where(SessionRecord.id == session_id)) is not None


def _not_found(session_id: str) -> SessionNotFoundError:
    error = SessionNotFoundError(f"no session {session_id!r}; `duogen sessions list` shows the sessions")
    error.session_id = session_id  # a server words it for its clients (no CLI command)
    return error


def gc(sessions: Sessions, *, grace_seconds: float = 3600.0) -> GcReport:
    """Remove image files that no session references, in this database or in any other database
    that shares the image store (see ``storage/registry.py``).

    Kept: files younger than ``grace_seconds`` (a tool call outside any session may be drawing
    them), every file written since the oldest turn still running in any process began (turns
    hold a lease on the store), the images an unfinished turn's checkpoints refer to, so that it
    can still be resumed (every file written since it began, when its state cannot be read). When
    another database on the store cannot be read (a server down, a password that is not in
    ``PGPASSWORD`` or ``~/.pgpass``), nothing is removed: its sessions may use any image, and a lost
    image is lost for good while a kept one costs only space. ``GcReport.note`` then says which.
    The store is held still while gc decides and deletes."""
    from duogen_agents.sessions.repository import GcReport

    removed = freed = kept = 0
    with sessions.store.collecting(grace_seconds) as cutoff:
        refs = _references(sessions)
        files = sessions.store.iter_files()
        if refs.note is not None:
            return GcReport(removed=0, freed_bytes=0, kept=sum(1 for image_id, _ in files if image_id), note=refs.note)
        cutoff = min(cutoff, refs.since)
        for image_id, path in files:
            if image_id in refs.ids:
                kept += 1
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_mtime > cutoff:
                kept += 1
                continue
            path.unlink(missing_ok=True)
            removed += 1
            freed += st.st_size
    return GcReport(removed=removed, freed_bytes=freed, kept=kept)


# ---- what the sessions of every database on the store reference ------------------------------------


@dataclass
class _Kept:
    """What garbage collection must keep: image ids some session references; ``since``: files
    modified after this time (an unfinished turn's start, when its state could not be read); ``note``:
    set when a database could not be read at all, and then nothing may be removed."""

    ids: set[str] = field(default_factory=set)
    since: float = math.inf
    note: str | None = None


def _references(sessions: Sessions, *, exclude: str | None = None) -> _Kept:
    """The references of every session of this database (but ``exclude``) and of every other
    database registered on the store. Never raises for what it reads: stored data is untrusted."""
    from duogen_agents.graphs.turn import build_state_graph

    kept = _Kept()
    with sessions.db.transaction() as s:
        artifacts = s.execute(select(ArtifactRecord.sha256).where(ArtifactRecord.session_id != exclude)).all()
        pending = s.execute(
            select(TurnRecord.session_id, type_coerce(TurnRecord.created_at, String)).where(
                TurnRecord.status.in_(UNFINISHED), TurnRecord.session_id != exclude
            )
        ).all()
    _scan(kept, artifacts, pending, sessions.state)

    own = identity(sessions.db.url)
    others: list[tuple[str | None, Any]] = list(registered(sessions.store))  # (name, None: unreadable; file)
    default = identity(f"sqlite:///{sessions.store.root / 'duogen.db'}")  # used before registering, perhaps
    if Path(default.removeprefix("sqlite:///")).is_file() and default not in {n for n, _ in others}:
        others.append((default, None))
    unreadable: list[str] = []
    for name, file in others:
        if name == own:
            continue
        if name is None:
            unreadable.append(f"the database named in {file}, which cannot be read")
            continue
        try:
            with open_read_only(name) as other:
                graph = build_state_graph(other.saver)
                _scan(
                    kept,
                    other.rows("SELECT sha256 FROM duogen_artifacts"),
                    other.rows(f"SELECT session_id, created_at FROM duogen_turns WHERE status IN {UNFINISHED_SQL}"),
                    lambda sid, g=graph: dict(g.get_state({"configurable": {"thread_id": sid}}).values or {}),
                )
        except Exception as e:  # any failure to read it means: keep everything
            unreadable.append(f"{_redact(name)} ({_first_line(e)[:160]})")
    if unreadable:
        kept.note = (
            "kept every image file: they may be used by the sessions of "
            + "; ".join(unreadable)
            + ", which share this image store (gc reads another SQLite database on it, never another server: "
            "run gc with that database's --db, or give each database its own DUOGEN_HOME; once a database is "
            "gone for good, `duogen sessions gc --forget NAME` drops it)"
        )
    return kept


def _scan(kept: _Kept, artifacts: Any, pending: Any, read_state: Any) -> None:
    kept.ids.update(row[0] for row in artifacts if is_image_id(row[0]))
    for session_id, started in pending:
        try:
            kept.ids |= _images_in_state(read_state(session_id))
        except Exception:  # unreadable state: keep whatever it may reference (below)
            at = _timestamp(started)
            kept.since = min(kept.since, at - LEASE_MARGIN_S if at is not None else -math.inf)


def _timestamp(value: object) -> float | None:
    """A turn's stored start time as a POSIX time (SQLite gives text, PostgreSQL a datetime), or None."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return (value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)).timestamp()


def _images_in_state(values: dict[str, Any]) -> set[str]:
    """The image ids an unfinished turn's checkpoints hold. Read without the session's lock: gc
    must never make a writer fail as busy, and it need not: the read is one consistent snapshot,
    and anything the turn writes after it is newer than the turn's lease, so the cut-off keeps it.
    Stored state is untrusted: anything but the expected shapes is ignored."""
    ids: set[object] = set()
    known = values.get("known_images")
    if isinstance(known, dict):
        ids.update(v.get("id") for v in known.values() if isinstance(v, dict))
    candidate = values.get("candidate")
    if isinstance(candidate, dict):
        ids.add(candidate.get("id"))
    rejected = values.get("rejected")
    for r in rejected if isinstance(rejected, list) else []:
        if isinstance(r, dict) and isinstance(r.get("image"), dict):
            ids.add(r["image"].get("id"))
    return {i for i in ids if is_image_id(i)}  # type: ignore[misc]
