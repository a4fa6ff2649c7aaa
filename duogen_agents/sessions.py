"""Persisted multi-turn sessions.

``Sessions`` reads and manages the sessions of one database without loading a model (list, show,
export, fork, delete, garbage-collect the image store). ``Session`` binds one conversation to an
``Agent``: each turn runs the turn graph with the database's LangGraph saver (thread id = session id),
so the planner sees every earlier turn with its images, references to earlier images resolve across
turns, and a turn cut short by a crash, Ctrl-C or an error continues with ``resume()``.

>>> agent = Agent.from_preset("tiny")                                  # doctest: +SKIP
>>> s = agent.session("balcony")                                       # doctest: +SKIP
>>> s.send("Plan a small balcony garden", mode="visual-plan")          # doctest: +SKIP
>>> s.send("Redraw step 2 with a blue pot")                            # doctest: +SKIP
>>> [t.prompt for t in s.history()]                                    # doctest: +SKIP

A turn's records (its blocks and image artifacts) are written in one transaction when it finishes;
until then the turn is ``running`` (or ``interrupted``) and its progress lives in the checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import func, select

from duogen_agents.document import ImageRef, InterleavedDocument, TextBlock
from duogen_agents.errors import (
    ConfigError,
    SessionNotFoundError,
    SessionStateError,
    StorageError,
    UnsafeCheckpointError,
)
from duogen_agents.storage.database import Database, check_session_id
from duogen_agents.storage.images import ImageStore, is_image_id, replaceable
from duogen_agents.storage.records import ArtifactRecord, BlockRecord, SessionRecord, TurnRecord, utcnow
from duogen_agents.validation import MAX_SEED, check_seed

if TYPE_CHECKING:
    from duogen_agents.agent import Agent

UNFINISHED = ("running", "interrupted")


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

    def _info(self, s: Any, rec: SessionRecord) -> SessionInfo:
        turns = s.scalar(select(func.count()).select_from(TurnRecord).where(TurnRecord.session_id == rec.id)) or 0
        images = (
            s.scalar(
                select(func.count())
                .select_from(ArtifactRecord)
                .where(ArtifactRecord.session_id == rec.id, ArtifactRecord.origin != "upload")
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
        )

    def exists(self, session_id: str) -> bool:
        with self.db.transaction() as s:
            return s.get(SessionRecord, session_id) is not None

    def get(self, session_id: str) -> SessionInfo:
        check_session_id(session_id)
        with self.db.transaction() as s:
            rec = s.get(SessionRecord, session_id)
            if rec is None:
                raise SessionNotFoundError(f"no session {session_id!r}; `duogen sessions list` shows the sessions")
            return self._info(s, rec)

    def list(self) -> list[SessionInfo]:
        """All sessions, most recently updated first."""
        with self.db.transaction() as s:
            recs = s.scalars(select(SessionRecord).order_by(SessionRecord.updated_at.desc())).all()
            return [self._info(s, r) for r in recs]

    def turns(self, session_id: str) -> list[TurnInfo]:
        """Every turn of the session in order, each with its document."""
        self.get(session_id)
        with self.db.transaction() as s:
            recs = s.scalars(
                select(TurnRecord).where(TurnRecord.session_id == session_id).order_by(TurnRecord.number)
            ).all()
            return [_turn_info(t) for t in recs]

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
        return InterleavedDocument(
            prompt=turns[0].prompt if turns else "",
            mode=turns[-1].mode if turns else info.mode,  # type: ignore[arg-type]
            preset=info.preset,
            title=info.title or info.id,
            blocks=blocks,
            inputs=inputs,
        )

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

    def export(self, session_id: str, fmt: str, out: Path | str | None) -> str | Path:
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
        doc = self.document(session_id)
        if fmt == "html":
            body = to_html(doc, self.store)
        elif fmt == "json":
            body = to_json(doc)
        else:
            if out is None:
                body = to_markdown(doc, link=lambda ref: str(self.store.path(ref.id)))
            else:
                image_dir = f"{out.stem}.images"
                body = to_markdown(doc, image_dir)
                for b in doc.images:
                    write_atomic(out.parent / image_dir / b.image.filename, self.store.read_bytes(b.image))
        if out is None:
            return body
        return write_atomic(out, body.encode())

    # ---- changing -------------------------------------------------------------------------------

    def fork(self, session_id: str, new_id: str | None = None) -> SessionInfo:
        """Copy a session (records and graph state) under a new id; the two then diverge."""
        src = self.get(session_id)
        new_id = check_session_id(new_id) if new_id is not None else f"{session_id[:50]}-{secrets.token_hex(3)}"
        with self.db.lock(session_id):
            if src.pending:
                raise SessionStateError(
                    f"session {session_id!r} has an unfinished turn; resume or cancel it before forking"
                )
            with self.db.lock(new_id):
                if self.exists(new_id):
                    raise ConfigError(f"a session {new_id!r} exists already; choose another id")
                self._copy_records(session_id, new_id)
                try:
                    values = self.state(session_id)
                    if values:
                        self.state_reader.update_state(
                            {"configurable": {"thread_id": new_id}}, values, as_node="finish"
                        )
                except BaseException:
                    self._delete_records(new_id)
                    raise
        return self.get(new_id)

    def _copy_records(self, src_id: str, new_id: str) -> None:
        with self.db.transaction() as s:
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

    def _delete_records(self, session_id: str) -> list[str]:
        with self.db.transaction() as s:
            shas = list(s.scalars(select(ArtifactRecord.sha256).where(ArtifactRecord.session_id == session_id)))
            rec = s.get(SessionRecord, session_id)
            if rec is not None:
                s.delete(rec)
            return shas

    def delete(self, session_id: str, *, wait: float | None = None) -> int:
        """Delete the session's records, its checkpoints, and the image files no other session
        references. Returns the number of image files removed."""
        self.get(session_id)
        with self.db.lock(session_id, wait=wait):
            shas = self._delete_records(session_id)
            self.db.saver.delete_thread(session_id)
            removed = 0
            with self.store.collecting(0.0) as cutoff:
                with self.db.transaction() as s:
                    still = set(s.scalars(select(ArtifactRecord.sha256).where(ArtifactRecord.sha256.in_(shas))))
                # Only well-formed ids name a file of the store; a tampered row names nothing to remove.
                for sha in {sha for sha in shas if is_image_id(sha)} - still:
                    if self.store.remove(sha, older_than=cutoff):
                        removed += 1
            return removed

    def gc(self, *, grace_seconds: float = 3600.0) -> GcReport:
        """Remove image files that no session references.

        Kept: files younger than ``grace_seconds`` (a tool call outside any session may be drawing
        them), every file written since the oldest turn still running in any process began (turns
        hold a lease on the store), and the images an unfinished turn's checkpoints refer to, so that
        it can still be resumed. The store is held still while gc decides and deletes."""
        removed = freed = kept = 0
        with self.store.collecting(grace_seconds) as cutoff:
            with self.db.transaction() as s:
                referenced = set(s.scalars(select(ArtifactRecord.sha256)))
                pending = list(s.scalars(select(TurnRecord.session_id).where(TurnRecord.status.in_(UNFINISHED))))
            for sid in pending:
                referenced |= self._images_in_state(sid)
            for image_id, path in self.store.iter_files():
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
        return GcReport(removed=removed, freed_bytes=freed, kept=kept)

    def _images_in_state(self, session_id: str) -> set[str]:
        """The image ids an unfinished turn's checkpoints hold. Read without the session's lock: gc
        must never make a writer fail as busy, and it need not: the read is one consistent snapshot,
        and anything the turn writes after it is newer than the turn's lease, so the cut-off keeps it."""
        values = self.state(session_id)
        ids = {v.get("id") for v in (values.get("known_images") or {}).values() if isinstance(v, dict)}
        if isinstance(values.get("candidate"), dict):
            ids.add(values["candidate"].get("id"))
        ids.update(r["image"].get("id") for r in values.get("rejected") or [] if isinstance(r.get("image"), dict))
        return {i for i in ids if is_image_id(i)}

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
        """Create the session if needed and record a ``running`` turn with its uploads; one transaction."""
        with self.db.transaction() as s:
            rec = s.get(SessionRecord, session_id)
            now = utcnow()
            if rec is None:
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

    def commit_turn(self, turn_id: int, values: dict[str, Any]) -> None:
        """Write the finished turn's blocks and images and mark it complete, in one transaction."""
        with self.db.transaction() as s:
            turn = s.get(TurnRecord, turn_id)
            assert turn is not None
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

    def set_turn_status(self, turn_id: int, status: str, error: str | None = None) -> None:
        with self.db.transaction() as s:
            turn = s.get(TurnRecord, turn_id)
            if turn is None:
                return
            turn.status = status
            turn.error = error
            if status == "cancelled":
                turn.finished_at = utcnow()
                for a in s.scalars(select(ArtifactRecord).where(ArtifactRecord.turn_id == turn_id)):
                    s.delete(a)

    def unfinished_turn(self, session_id: str) -> TurnRecord | None:
        with self.db.transaction() as s:
            t = s.scalar(
                select(TurnRecord)
                .where(TurnRecord.session_id == session_id)
                .order_by(TurnRecord.number.desc())
                .limit(1)
            )
            return t if t is not None and t.status in UNFINISHED else None


class Session:
    """One persisted conversation, driven by an ``Agent``. Created in the database by its first turn."""

    def __init__(self, agent: Agent, sessions: Sessions, session_id: str | None = None, *, wait: float | None = None):
        from duogen_agents.graphs.turn import build_graph

        self.agent = agent
        self.sessions = sessions
        self.id = check_session_id(session_id) if session_id is not None else secrets.token_hex(4)
        self.wait = wait
        self.graph = build_graph(agent.deps, checkpointer=sessions.db.saver)

    @property
    def db(self) -> Database:
        return self.sessions.db

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the session's write lock; a refused checkpoint names this session."""
        with self.db.lock(self.id, wait=self.wait), _naming(self.id):
            yield

    def _config(self, checkpoint_id: str | None = None) -> dict[str, Any]:
        config = self.agent.config(self.id)
        if checkpoint_id:
            config["configurable"]["checkpoint_id"] = checkpoint_id
        return config

    def info(self) -> SessionInfo:
        return self.sessions.get(self.id)

    def history(self) -> list[TurnInfo]:
        """Every turn so far, each with its document (empty for a session not yet created)."""
        return self.sessions.turns(self.id) if self.sessions.exists(self.id) else []

    def pending_turn(self) -> TurnInfo | None:
        """The last turn if it did not finish (``resume()`` continues it), else ``None``."""
        last = self.sessions.last_turn(self.id)
        return last if last is not None and last.status in UNFINISHED else None

    # ---- turns ----------------------------------------------------------------------------------

    def stream(
        self,
        prompt: str,
        *,
        mode: str | None = None,
        images: Sequence[str | Path] = (),
        seed: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Send one message and yield the turn's events (as ``Agent.stream``); the session's earlier
        turns and their images are the planner's context. ``mode=None`` keeps the session's mode."""
        check_seed(seed)
        if mode is None:
            mode = self.sessions.get(self.id).mode if self.sessions.exists(self.id) else "interleaved"
        with self.agent.store.lease():  # gc keeps what this turn writes, from its uploads on
            yield from self._send(prompt, mode, images, seed)

    def _send(self, prompt: str, mode: str, images: Sequence[str | Path], seed: int | None) -> Iterator[dict[str, Any]]:
        refs = self.agent.store_inputs(prompt, mode, images)
        with self._writing():
            if self.sessions.unfinished_turn(self.id) is not None:
                raise SessionStateError(
                    f"session {self.id!r} has an unfinished turn; resume it (duogen run --session {self.id} "
                    "--resume) or cancel it first"
                )
            seed = self.agent.preset.seed if seed is None else seed
            base = self.graph.get_state(self._config()).config["configurable"].get("checkpoint_id")
            turn_id = self.sessions.begin_turn(
                self.id, prompt=prompt, mode=mode, preset=self.agent.preset.name, seed=seed, inputs=refs,
                base_checkpoint_id=base,
            )  # fmt: skip
            state = self.agent.input_state(prompt, mode, refs, seed)
            yield from self._drive(turn_id, state, prompt, mode, refs)

    def send(self, prompt: str, **kwargs: Any) -> InterleavedDocument:
        """Send one message; returns the turn's document."""
        return _last_document(self.stream(prompt, **kwargs))

    def _drive(
        self, turn_id: int, graph_input: Any, prompt: str, mode: str, refs: Sequence[Any]
    ) -> Iterator[dict[str, Any]]:
        try:
            if graph_input is not None or self.graph.get_state(self._config()).next:
                yield from self.agent.graph_events(self.graph, graph_input, self._config())
            values = dict(self.graph.get_state(self._config()).values)
            self.sessions.commit_turn(turn_id, values)
        except BaseException as e:  # Ctrl-C, an error, or the caller closing the stream
            error = None if isinstance(e, (KeyboardInterrupt, GeneratorExit)) else f"{type(e).__name__}: {e}"
            self.sessions.set_turn_status(turn_id, "interrupted", error)
            raise
        doc = self.agent.document(values, prompt, mode, refs)
        yield {"event": "document", "document": doc, "thread_id": self.id, "session_id": self.id}

    def redraw(self, number: int, *, seed: int | None = None) -> Iterator[dict[str, Any]]:
        """Draw image ``number`` (1-based, over the session's images in order) again: the same prompt
        and references with a new seed, as a turn of its own; the new image joins the conversation."""
        from langchain_core.messages import HumanMessage

        with self._writing(), self.agent.store.lease():
            if self.sessions.unfinished_turn(self.id) is not None:
                raise SessionStateError(f"session {self.id!r} has an unfinished turn; resume or cancel it first")
            images = [b for t in self.history() if t.status == "complete" for b in t.document.images]
            if not 1 <= number <= len(images):
                raise ConfigError(f"no image {number}: this session has {len(images)} image(s)")
            old = images[number - 1]
            seed = secrets.randbelow(MAX_SEED + 1) if check_seed(seed) is None else seed
            prompt = f"Draw image {number} again: {old.prompt}"
            mode = self.sessions.get(self.id).mode
            base = self.graph.get_state(self._config()).config["configurable"].get("checkpoint_id")
            turn_id = self.sessions.begin_turn(
                self.id, prompt=prompt, mode=mode, preset=self.agent.preset.name, seed=seed, inputs=[],
                base_checkpoint_id=base,
            )  # fmt: skip
            state = {
                "messages": [HumanMessage(content=[{"type": "text", "text": prompt}])],
                "mode": mode,
                "seed": seed,
                "request": {
                    "prompt": old.prompt,
                    "references": list(old.references),
                    "kind": old.kind,
                    "origin": "draft" if old.origin == "draft" else "generated",
                    "step": old.step,
                    "attempt": 1,
                    "seed": 0,
                },
            }
            yield from self._drive(turn_id, state, prompt, mode, [])

    def resume(self) -> Iterator[dict[str, Any]]:
        """Continue the unfinished last turn from its last checkpoint, yielding its events.
        Raises ``SessionStateError`` when nothing is pending."""
        with self._writing(), self.agent.store.lease():
            turn = self.sessions.unfinished_turn(self.id)
            if turn is None:
                raise SessionStateError(f"session {self.id!r} has no unfinished turn; nothing to resume")
            self.sessions.set_turn_status(turn.id, "running")
            refs = [ImageRef.model_validate(r) for r in turn.inputs or []]
            current = self.graph.get_state(self._config()).config["configurable"].get("checkpoint_id")
            graph_input = None
            if current == turn.base_checkpoint_id:
                # Interrupted before its first checkpoint: start the turn again from its message.
                graph_input = self.agent.input_state(turn.prompt, turn.mode, refs, turn.seed)
            yield from self._drive(turn.id, graph_input, turn.prompt, turn.mode, refs)

    def cancel(self) -> bool:
        """Drop the unfinished last turn: the graph state goes back to where the turn began and the
        turn is marked ``cancelled``. Returns whether there was one."""
        with self._writing():
            turn = self.sessions.unfinished_turn(self.id)
            if turn is None:
                return False
            if turn.base_checkpoint_id:
                base = {"configurable": {"thread_id": self.id, "checkpoint_id": turn.base_checkpoint_id}}
                self.graph.update_state(base, None, as_node="__copy__")
            else:
                self.db.saver.delete_thread(self.id)
            self.sessions.set_turn_status(turn.id, "cancelled")
            return True


def _last_document(events: Iterator[dict[str, Any]]) -> InterleavedDocument:
    doc: InterleavedDocument | None = None
    for event in events:
        if event.get("event") == "document":
            doc = event["document"]
    assert doc is not None
    return doc
