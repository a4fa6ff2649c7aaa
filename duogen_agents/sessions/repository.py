"""The records of stored sessions: reading them, and writing a turn's records (``Sessions``).

``Sessions`` reads and manages the sessions of one database without loading a model; the archive
operations (export, fork, delete, gc) are in ``archive.py``, the turn driver (``Session``) in
``driver.py``. A turn's records (its blocks and image artifacts) are written in one transaction when
it finishes; until then the turn is ``running`` (or ``interrupted``) and its progress lives in the
checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import String, func, select, type_coerce

from duogen_agents.document import ImageRef, InterleavedDocument, TextBlock
from duogen_agents.errors import (
    StorageError,
    UnsafeCheckpointError,
)
from duogen_agents.sessions import archive
from duogen_agents.storage import registry
from duogen_agents.storage.database import Database, check_session_id
from duogen_agents.storage.images import ImageStore
from duogen_agents.storage.records import UNFINISHED, ArtifactRecord, BlockRecord, SessionRecord, TurnRecord, utcnow

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class SessionInfo:
    id: str
    title: str | None
    preset: str
    mode: str
    parent_id: str | None
    created_at: datetime
    updated_at: datetime
    turns: int
    images: int
    last_status: str | None
    malformed: str | None = None
    """Set when the session's own record holds a value that does not decode (it was changed outside
    duogen): the reason. Its dates then read as the epoch; ``delete`` still removes it."""

    @property
    def pending(self) -> bool:
        """The last turn did not finish: ``resume()`` continues it, ``cancel()`` drops it."""
        return self.last_status in UNFINISHED


@dataclass(frozen=True)
class TurnInfo:
    number: int
    prompt: str
    mode: str
    preset: str
    status: str
    stop_reason: str | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    document: InterleavedDocument


@dataclass(frozen=True)
class GcReport:
    removed: int
    freed_bytes: int
    kept: int
    note: str | None = None
    """Why nothing was removed, when another database on the image store could not be read."""


@contextlib.contextmanager
def _naming(session_id: str) -> Iterator[None]:
    """Say which session a refused checkpoint belongs to (the serializer cannot know)."""
    try:
        yield
    except UnsafeCheckpointError as e:
        if str(e).startswith("session "):
            raise
        raise UnsafeCheckpointError(
            f"session {session_id!r}: {e}. Its stored state was changed outside duogen; export or delete it"
        ) from None


# A stored value that does not decode: invalid JSON in a block or a turn's uploads, a date that is
# not one (SQLite stores whatever it is given; PostgreSQL's column types refuse these on write).
_DECODE_ERRORS = (ValueError, TypeError)


def _malformed(where: str, e: BaseException) -> StorageError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return StorageError(f"{where}: the stored record is malformed ({reason}); it was changed outside duogen")


@contextlib.contextmanager
def _decoding(session_id: str, number: object = None) -> Iterator[None]:
    """Report a stored value that does not decode as a malformed record, in one line naming the
    session (and turn), as the structurally wrong ones are: never an internal error."""
    try:
        yield
    except StorageError:
        raise
    except _DECODE_ERRORS as e:
        where = f"session {session_id!r}" + (f" turn {number}" if number is not None else "")
        raise _malformed(where, e) from None


def _turn_info(t: TurnRecord) -> TurnInfo:
    try:
        doc = InterleavedDocument.model_validate(
            {
                "prompt": t.prompt,
                "mode": t.mode,
                "preset": t.preset,
                "title": t.title,
                "blocks": [b.data for b in t.blocks],
                "inputs": t.inputs or [],
            }
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StorageError(
            f"session {t.session_id!r} turn {t.number}: the stored record is malformed at {where} ({first['msg']}); "
            "it was changed outside duogen"
        ) from None
    return TurnInfo(
        number=t.number,
        prompt=t.prompt,
        mode=t.mode,
        preset=t.preset,
        status=t.status,
        stop_reason=t.stop_reason,
        error=t.error,
        created_at=t.created_at,
        finished_at=t.finished_at,
        document=doc,
    )


class Sessions:
    """The sessions of one database and the image store they share; no model is loaded."""

    def __init__(self, db: Database, store: ImageStore) -> None:
        self.db = db
        self.store = store
        self._reader: Any = None
        # gc and delete on any database sharing this store must see this one's references.
        if store is not None:  # some callers only read records
            registry.register(store, db.url)

    @classmethod
    def open(cls, url: str | None = None, *, home: Path | str | None = None) -> Sessions:
        from duogen_agents.storage.images import default_home

        root = Path(home) if home is not None else default_home()
        return cls(Database.open(url, home=root), ImageStore(root))

    def close(self) -> None:
        self.db.close()

    # ---- reading --------------------------------------------------------------------------------

    @property
    def state_reader(self) -> Any:
        """A model-free compiled graph over the session state (read, copy, restore)."""
        if self._reader is None:
            from duogen_agents.graphs.turn import build_state_graph

            self._reader = build_state_graph(self.db.saver)
        return self._reader

    def state(self, session_id: str) -> dict[str, Any]:
        """The session's graph state as the last checkpoint holds it (``{}`` for none). Raises
        ``UnsafeCheckpointError`` naming the session when a checkpoint holds a type outside the
        allow-list, so a command can check a session before it loads any model."""
        with _naming(session_id):
            return dict(self.state_reader.get_state({"configurable": {"thread_id": session_id}}).values or {})

    def _info(self, s: Any, session_id: str) -> SessionInfo:
        """One session's summary. A record whose own values do not decode is still listed, flagged
        ``malformed`` with its dates at the epoch, so that one bad row never hides the others."""
        malformed = None
        try:
            with _decoding(session_id):
                rec = s.get(SessionRecord, session_id)
        except StorageError as e:
            malformed = str(e)
            row = s.execute(
                select(SessionRecord.title, SessionRecord.preset, SessionRecord.mode, SessionRecord.parent_id).where(
                    SessionRecord.id == session_id
                )
            ).one()
            rec = SessionRecord(
                id=session_id, title=row[0], preset=row[1], mode=row[2], parent_id=row[3], created_at=_EPOCH,
                updated_at=_EPOCH,
            )  # fmt: skip
        if rec is None:
            raise archive._not_found(session_id)
        turns = s.scalar(select(func.count()).select_from(TurnRecord).where(TurnRecord.session_id == rec.id)) or 0
        images = (  # the pictures its answers show (not uploads, nor the ones a check rejected), as `show` does
            s.scalar(
                select(func.count())
                .select_from(BlockRecord)
                .join(TurnRecord, BlockRecord.turn_id == TurnRecord.id)
                .where(TurnRecord.session_id == rec.id, BlockRecord.image_sha256.is_not(None))
            )
            or 0
        )
        last = s.scalar(
            select(TurnRecord.status).where(TurnRecord.session_id == rec.id).order_by(TurnRecord.number.desc()).limit(1)
        )
        return SessionInfo(
            id=rec.id,
            title=rec.title,
            preset=rec.preset,
            mode=rec.mode,
            parent_id=rec.parent_id,
            created_at=rec.created_at,
            updated_at=rec.updated_at,
            turns=turns,
            images=images,
            last_status=last,
            malformed=malformed,
        )

    def exists(self, session_id: str) -> bool:
        with self.db.transaction() as s:
            return s.scalar(select(SessionRecord.id).where(SessionRecord.id == session_id)) is not None

    def get(self, session_id: str) -> SessionInfo:
        """The session's summary; ``StorageError`` naming it when its record is malformed."""
        check_session_id(session_id)
        with self.db.transaction() as s:
            info = self._info(s, session_id)
        if info.malformed:
            raise StorageError(info.malformed)
        return info

    def list(self) -> list[SessionInfo]:
        """All sessions, most recently updated first; a malformed one is listed and flagged ``malformed``."""
        with self.db.transaction() as s:
            ids = s.scalars(select(SessionRecord.id).order_by(SessionRecord.updated_at.desc())).all()
            return [self._info(s, i) for i in ids]

    def turns(self, session_id: str) -> list[TurnInfo]:
        """Every turn of the session in order, each with its document."""
        self.get(session_id)
        with self.db.transaction() as s:
            query = select(TurnRecord).where(TurnRecord.session_id == session_id).order_by(TurnRecord.number)
            try:
                return [_turn_info(t) for t in s.scalars(query).all()]
            except _DECODE_ERRORS:  # a value that does not decode: read turn by turn to name the one
                s.expunge_all()
                return self._turns_one_by_one(s, session_id)

    @staticmethod
    def _turns_one_by_one(s: Any, session_id: str) -> list[TurnInfo]:
        """``turns``, each turn loaded alone, so that a malformed one is a ``StorageError`` naming it."""
        out = []
        for turn_id, number in s.execute(
            select(TurnRecord.id, TurnRecord.number)
            .where(TurnRecord.session_id == session_id)
            .order_by(TurnRecord.number)
        ):
            with _decoding(session_id, number):
                out.append(_turn_info(s.get_one(TurnRecord, turn_id)))
        return out

    def last_turn(self, session_id: str) -> TurnInfo | None:
        turns = self.turns(session_id) if self.exists(session_id) else []
        return turns[-1] if turns else None

    def document(self, session_id: str) -> InterleavedDocument:
        """The whole conversation as one document: each finished turn's prompt, then its answer."""
        info = self.get(session_id)
        blocks: list[Any] = []
        inputs: list[ImageRef] = []
        turns = [t for t in self.turns(session_id) if t.status == "complete"]
        for t in turns:
            blocks.append(TextBlock(text=f"**You:** {t.prompt}"))
            blocks.extend(t.document.blocks)
            inputs.extend(r for r in t.document.inputs if r not in inputs)
        try:
            return InterleavedDocument(
                prompt=turns[0].prompt if turns else "",
                mode=turns[-1].mode if turns else info.mode,  # type: ignore[arg-type]
                preset=info.preset,
                title=info.title or info.id,
                blocks=blocks,
                inputs=inputs,
            )
        except ValidationError as e:
            raise StorageError(
                f"session {session_id!r}: the stored record is malformed ({e.errors()[0]['msg']}); "
                "it was changed outside duogen"
            ) from None

    def image_artifacts(self, session_id: str) -> list[dict[str, Any]]:
        """The session's image records (uploads, generated, drafts, rejected), oldest first."""
        with self.db.transaction() as s:
            recs = s.scalars(
                select(ArtifactRecord).where(ArtifactRecord.session_id == session_id).order_by(ArtifactRecord.id)
            ).all()
            return [
                {
                    "sha256": a.sha256,
                    "mime": a.mime,
                    "size": a.size,
                    "width": a.width,
                    "height": a.height,
                    "origin": a.origin,
                    "parent_sha256": a.parent_sha256,
                    "request": a.request,
                    "turn_id": a.turn_id,
                }
                for a in recs
            ]

    # ---- archive operations (sessions/archive.py) ---------------------------------------------------

    def export(self, session_id: str, fmt: str, out: Path | str | None) -> str | Path:
        """Export as ``html`` (self-contained), ``md`` (images copied beside it) or ``json``; see
        ``archive.export``."""
        return archive.export(self, session_id, fmt, out)

    def fork(self, session_id: str, new_id: str | None = None, *, wait: float | None = None) -> SessionInfo:
        """Copy a session (records and graph state) under a new id; the two then diverge. ``wait``:
        seconds to wait for a turn writing it (None: fail at once as busy)."""
        return archive.fork(self, session_id, new_id, wait=wait)

    def delete(self, session_id: str, *, wait: float | None = None, notes: list[str] | None = None) -> int:
        """Delete a session, its checkpoints and the image files no other session references; see
        ``archive.delete`` (``notes`` gets a line when images were kept because another database on
        the store could not be read)."""
        return archive.delete(self, session_id, wait=wait, notes=notes)

    def gc(self, *, grace_seconds: float = 3600.0) -> GcReport:
        """Remove image files that no session references; see ``archive.gc`` for what is kept."""
        return archive.gc(self, grace_seconds=grace_seconds)

    # ---- turn records (used by Session) ---------------------------------------------------------

    def begin_turn(
        self,
        session_id: str,
        *,
        prompt: str,
        mode: str,
        preset: str,
        seed: int,
        inputs: Sequence[ImageRef],
        base_checkpoint_id: str | None,
    ) -> int:
        """Create the session if needed and record a ``running`` turn with its uploads; one transaction.

        A new session starts from no state: checkpoints left under its id (a delete cut short by an
        older duogen, a saver used outside a session) are cleared in the same transaction, so it never
        inherits another conversation. The caller holds the session's write lock (see ``commit_turn``)."""
        self.db.saver  # noqa: B018 -- its tables exist before the transaction (see archive.clear_checkpoints)
        with self.db.writing(session_id) as s:
            with _decoding(session_id):
                rec = s.get(SessionRecord, session_id)
            now = utcnow()
            if rec is None:
                archive.clear_checkpoints(self.db, s, session_id)
                base_checkpoint_id = None
                rec = SessionRecord(id=session_id, preset=preset, mode=mode, created_at=now, updated_at=now)
                s.add(rec)
            number = (s.scalar(select(func.max(TurnRecord.number)).where(TurnRecord.session_id == session_id)) or 0) + 1
            turn = TurnRecord(
                session_id=session_id,
                number=number,
                prompt=prompt,
                mode=mode,
                preset=preset,
                seed=seed,
                status="running",
                base_checkpoint_id=base_checkpoint_id,
                inputs=[r.model_dump() for r in inputs],
                created_at=now,
            )
            s.add(turn)
            s.flush()
            for r in inputs:
                self._add_artifact(s, session_id, turn.id, r, "upload", None, None)
            rec.updated_at = now
            return turn.id

    def _add_artifact(
        self,
        s: Any,
        session_id: str,
        turn_id: int,
        ref: ImageRef,
        origin: str,
        parent: str | None,
        request: dict[str, Any] | None,
    ) -> None:
        exists = s.scalar(
            select(ArtifactRecord.id).where(ArtifactRecord.session_id == session_id, ArtifactRecord.sha256 == ref.id)
        )
        if exists is not None:
            return
        path = self.store.path(ref.id)
        s.add(
            ArtifactRecord(
                session_id=session_id,
                turn_id=turn_id,
                sha256=ref.id,
                mime=ref.mime,
                size=path.stat().st_size if path.exists() else 0,
                width=ref.width,
                height=ref.height,
                origin=origin,
                parent_sha256=parent,
                request=request,
                created_at=utcnow(),
            )
        )
        s.flush()

    def commit_turn(self, session_id: str, turn_id: int, values: dict[str, Any]) -> None:
        """Write the finished turn's blocks and images and mark it complete, in one transaction. The
        caller holds the session's write lock: on PostgreSQL the transaction checks it, on the lock's
        own connection, and fails with the lock lost (``Database.writing``)."""
        with self.db.writing(session_id) as s:
            turn = s.get(TurnRecord, turn_id)
            assert turn is not None and turn.session_id == session_id
            for b in list(turn.blocks):
                s.delete(b)
            s.flush()
            blocks = values.get("blocks") or []
            for i, b in enumerate(blocks):
                image = b.get("image")
                s.add(
                    BlockRecord(
                        turn_id=turn_id,
                        position=i,
                        type=b["type"],
                        text=b.get("text"),
                        image_sha256=image["id"] if image else None,
                        data=b,
                    )
                )
                if image:
                    request = {k: b.get(k) for k in ("prompt", "kind", "references", "step", "seed", "attempts")}
                    parent = b["references"][0] if b.get("kind") == "edit" and b.get("references") else None
                    self._add_artifact(
                        s, turn.session_id, turn_id, ImageRef.model_validate(image), b["origin"], parent, request
                    )
            for r in values.get("rejected") or []:
                request = {k: r.get(k) for k in ("prompt", "kind", "references", "step", "seed")}
                request |= {"attempts": r.get("attempt"), "rejected": r.get("note")}
                self._add_artifact(
                    s, turn.session_id, turn_id, ImageRef.model_validate(r["image"]), r["origin"], None, request
                )
            now = utcnow()
            turn.status = "complete"
            turn.stop_reason = values.get("stop_reason")
            turn.title = values.get("title")
            turn.error = None
            turn.finished_at = now
            rec = s.get(SessionRecord, turn.session_id)
            assert rec is not None
            rec.updated_at = now
            rec.mode = turn.mode
            if rec.title is None:
                rec.title = turn.title or turn.prompt.strip().splitlines()[0][:80]

    def set_turn_status(self, session_id: str, turn_id: int, status: str, error: str | None = None) -> None:
        """Set the status of a turn of ``session_id``, whose write lock the caller holds (see ``commit_turn``)."""
        with self.db.writing(session_id) as s:
            turn = s.get(TurnRecord, turn_id)
            if turn is None:
                return
            turn.status = status
            turn.error = error
            if status == "cancelled":
                turn.finished_at = utcnow()
                for a in s.scalars(select(ArtifactRecord).where(ArtifactRecord.turn_id == turn_id)):
                    s.delete(a)

    def answered_before(self, session_id: str, number: int) -> bool:
        """Whether a turn before turn ``number`` of the session was answered (is ``complete``)."""
        with self.db.transaction() as s:
            query = select(TurnRecord.id).where(
                TurnRecord.session_id == session_id, TurnRecord.number < number, TurnRecord.status == "complete"
            )
            return s.scalar(query.limit(1)) is not None

    def unfinished_turn(self, session_id: str) -> TurnRecord | None:
        with self.db.transaction() as s:
            last = s.execute(
                select(TurnRecord.id, TurnRecord.number, TurnRecord.status)
                .where(TurnRecord.session_id == session_id)
                .order_by(TurnRecord.number.desc())
                .limit(1)
            ).first()
            if last is None or last.status not in UNFINISHED:
                return None
            try:
                return s.get_one(TurnRecord, last.id)
            except _DECODE_ERRORS:
                pass
            # A value of it does not decode: the turn as far as it reads, its uploads as the raw
            # text (resuming it then says they are malformed; cancelling it needs none of them).
            s.expunge_all()
            cols = ("id", "session_id", "number", "prompt", "mode", "preset", "seed", "status", "base_checkpoint_id")
            row = s.execute(
                select(*(getattr(TurnRecord, c) for c in cols), type_coerce(TurnRecord.inputs, String)).where(
                    TurnRecord.id == last.id
                )
            ).one()
            return TurnRecord(**dict(zip(cols, row[:-1], strict=True)), inputs=row[-1])
