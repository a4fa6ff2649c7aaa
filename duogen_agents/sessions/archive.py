"""Archive operations on stored sessions: export, fork, delete and garbage-collect the image store.

None loads a model. ``Sessions`` exposes each as a method (``sessions.fork(...)``); they live here so
the repository of records stays small.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from duogen_agents.errors import ConfigError, SessionExistsError, SessionStateError, StorageError
from duogen_agents.storage.database import check_session_id
from duogen_agents.storage.images import is_image_id, replaceable
from duogen_agents.storage.records import UNFINISHED, ArtifactRecord, BlockRecord, SessionRecord, TurnRecord, utcnow

if TYPE_CHECKING:
    from duogen_agents.sessions.repository import GcReport, SessionInfo, Sessions


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


def fork(sessions: Sessions, session_id: str, new_id: str | None = None) -> SessionInfo:
    """Copy a session (records and graph state) under a new id; the two then diverge."""
    sessions.get(session_id)
    new_id = check_session_id(new_id) if new_id is not None else f"{session_id[:50]}-{secrets.token_hex(3)}"
    if new_id == session_id:  # before the locks: the second would wait for the first, held by this process
        raise SessionExistsError(f"a session {new_id!r} exists already (it is the one to fork); choose another id")
    with sessions.db.lock(session_id):
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
                _delete_records(sessions, new_id)
                raise
    return sessions.get(new_id)


def _copy_records(sessions: Sessions, src_id: str, new_id: str) -> None:
    with sessions.db.transaction() as s:
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


def _delete_records(sessions: Sessions, session_id: str) -> list[str]:
    with sessions.db.transaction() as s:
        shas = list(s.scalars(select(ArtifactRecord.sha256).where(ArtifactRecord.session_id == session_id)))
        rec = s.get(SessionRecord, session_id)
        if rec is not None:
            s.delete(rec)
        return shas


def delete(sessions: Sessions, session_id: str, *, wait: float | None = None) -> int:
    """Delete the session's records, its checkpoints, and the image files no other session
    references. Returns the number of image files removed."""
    sessions.get(session_id)
    with sessions.db.lock(session_id, wait=wait):
        shas = _delete_records(sessions, session_id)
        sessions.db.saver.delete_thread(session_id)
        removed = 0
        with sessions.store.collecting(0.0) as cutoff:
            with sessions.db.transaction() as s:
                still = set(s.scalars(select(ArtifactRecord.sha256).where(ArtifactRecord.sha256.in_(shas))))
                pending = list(s.scalars(select(TurnRecord.session_id).where(TurnRecord.status.in_(UNFINISHED))))
            # Images are shared by content: another session's unfinished turn may hold one in its
            # checkpoints only (not yet in its records); it must still resume.
            for sid in pending:
                still |= _images_in_state(sessions, sid)
            # Only well-formed ids name a file of the store; a tampered row names nothing to remove.
            for sha in {sha for sha in shas if is_image_id(sha)} - still:
                if sessions.store.remove(sha, older_than=cutoff):
                    removed += 1
        return removed


def gc(sessions: Sessions, *, grace_seconds: float = 3600.0) -> GcReport:
    """Remove image files that no session references.

    Kept: files younger than ``grace_seconds`` (a tool call outside any session may be drawing
    them), every file written since the oldest turn still running in any process began (turns
    hold a lease on the store), and the images an unfinished turn's checkpoints refer to, so that
    it can still be resumed. The store is held still while gc decides and deletes."""
    removed = freed = kept = 0
    with sessions.store.collecting(grace_seconds) as cutoff:
        with sessions.db.transaction() as s:
            referenced = set(s.scalars(select(ArtifactRecord.sha256)))
            pending = list(s.scalars(select(TurnRecord.session_id).where(TurnRecord.status.in_(UNFINISHED))))
        for sid in pending:
            referenced |= _images_in_state(sessions, sid)
        for image_id, path in sessions.store.iter_files():
            if image_id in referenced:
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
    from duogen_agents.sessions.repository import GcReport

    return GcReport(removed=removed, freed_bytes=freed, kept=kept)


def _images_in_state(sessions: Sessions, session_id: str) -> set[str]:
    """The image ids an unfinished turn's checkpoints hold. Read without the session's lock: gc
    must never make a writer fail as busy, and it need not: the read is one consistent snapshot,
    and anything the turn writes after it is newer than the turn's lease, so the cut-off keeps it.
    Stored state is untrusted: anything but the expected shapes is ignored."""
    values = sessions.state(session_id)
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
