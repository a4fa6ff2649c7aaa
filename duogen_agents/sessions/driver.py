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
import re
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from duogen_agents.document import ImageRef, InterleavedDocument
from duogen_agents.errors import ConfigError, SessionStateError, StorageError
from duogen_agents.sessions.repository import UNFINISHED, SessionInfo, Sessions, TurnInfo, _naming
from duogen_agents.storage.database import Database, check_session_id
from duogen_agents.validation import MAX_SEED, check_seed

if TYPE_CHECKING:
    from duogen_agents.agent import Agent


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
        if checkpoint_id:  # with its namespace: SqliteSaver hands this config back as the checkpoint's own
            config["configurable"].update(checkpoint_id=checkpoint_id, checkpoint_ns="")
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
        images: Sequence[Any] = (),
        seed: int | None = None,
        version: str = "v1",
    ) -> Iterator[dict[str, Any]]:
        """Send one message and yield the turn's events (as ``Agent.stream``, ``version="v2"`` for
        LangGraph v2 stream parts); the session's earlier turns and their images are the planner's
        context. ``mode=None`` keeps the session's mode."""
        if version == "v2":
            from duogen_agents.agent import as_stream_parts

            yield from as_stream_parts(self.stream(prompt, mode=mode, images=images, seed=seed))
            return
        if version != "v1":
            raise ConfigError(f"unknown stream version {version!r}; use v1 (event dicts) or v2 (stream parts)")
        yield from self._stream(prompt, mode, images, seed, events=True)

    def _stream(
        self, prompt: str, mode: str | None, images: Sequence[Any], seed: int | None, *, events: bool, stop: Any = None
    ) -> Iterator[dict[str, Any]]:
        check_seed(seed)
        if mode is None:
            mode = self.sessions.get(self.id).mode if self.sessions.exists(self.id) else "interleaved"
        with self.agent.store.lease():  # gc keeps what this turn writes, from its uploads on
            yield from self._send(prompt, mode, images, seed, events, stop)

    def _send(
        self, prompt: str, mode: str, images: Sequence[Any], seed: int | None, events: bool = True, stop: Any = None
    ) -> Iterator[dict[str, Any]]:
        refs = self.agent.store_inputs(prompt, mode, images)
        with self._writing():
            if self.sessions.unfinished_turn(self.id) is not None:
                raise SessionStateError(
                    f"session {self.id!r} has an unfinished turn; resume or drop it first (duogen run --session "
                    f"{self.id} --resume, or --discard PROMPT to drop it and send PROMPT; over HTTP, POST "
                    f"/v1/sessions/{self.id}/resume or /cancel)"
                )
            seed = self.agent.preset.seed if seed is None else seed
            base = self.graph.get_state(self._config()).config["configurable"].get("checkpoint_id")
            turn_id = self.sessions.begin_turn(
                self.id, prompt=prompt, mode=mode, preset=self.agent.preset.name, seed=seed, inputs=refs,
                base_checkpoint_id=base,
            )  # fmt: skip
            state = self.agent.input_state(prompt, mode, refs, seed)
            yield from self._drive(turn_id, state, prompt, mode, refs, events=events, stop=stop)

    async def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """``stream`` for asyncio (model calls in a worker thread)."""
        from contextlib import aclosing

        from duogen_agents.agent import aiterate

        async with aclosing(aiterate(self.stream(prompt, **kwargs))) as events:
            async for event in events:
                yield event

    async def asend(self, prompt: str, **kwargs: Any) -> InterleavedDocument:
        """``send`` for asyncio."""
        from duogen_agents.agent import alast_document

        return await alast_document(self.astream(prompt, **kwargs))

    def send(self, prompt: str, **kwargs: Any) -> InterleavedDocument:
        """Send one message; returns the turn's document."""
        from duogen_agents.agent import last_document

        if set(kwargs) - {"mode", "images", "seed"}:
            return last_document(self.stream(prompt, **kwargs))  # its error
        return last_document(
            self._stream(prompt, kwargs.get("mode"), kwargs.get("images", ()), kwargs.get("seed"), events=False)
        )

    def _drive(
        self,
        turn_id: int,
        graph_input: Any,
        prompt: str,
        mode: str,
        refs: Sequence[Any],
        *,
        events: bool = True,
        stop: Any = None,
    ) -> Iterator[dict[str, Any]]:
        try:
            # A turn cut short while a node ran in the stream's worker thread may have that node's
            # writes saved without the step committed: ``next`` is then empty though the graph is not
            # done; its ``tasks`` are not (and the graph goes on from those writes, not running it again).
            state = self.graph.get_state(self._config())
            if graph_input is not None or state.next or state.tasks:
                yield from self.agent.graph_events(self.graph, graph_input, self._config(), events=events, stop=stop)
            values = dict(self.graph.get_state(self._config()).values)
            # Each checkpoint write checked the lock (PostgreSQL); the commit checks it in its own transaction.
            self.sessions.commit_turn(self.id, turn_id, values)
        except BaseException as e:  # Ctrl-C, an error, or the caller closing the stream
            if not self.db.holds_lock(self.id):
                raise  # the lock died with its connection: the turn may be another writer's now
            error = None if isinstance(e, (KeyboardInterrupt, GeneratorExit)) else f"{type(e).__name__}: {e}"
            self.sessions.set_turn_status(self.id, turn_id, "interrupted", error)
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
            images = self._images()
            if not 1 <= number <= len(images):
                raise ConfigError(f"no image {number}: this session has {len(images)} image(s)")
            seed = secrets.randbelow(MAX_SEED + 1) if check_seed(seed) is None else seed
            prompt, request = _redraw(number, images[number - 1])
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
                "request": request,
            }
            yield from self._drive(turn_id, state, prompt, mode, [])

    def _images(self) -> list[Any]:
        """The image blocks of the session's answers, in order: what ``redraw`` numbers from 1."""
        return [b for t in self.history() if t.status == "complete" for b in t.document.images]

    def _redraw_request(self, prompt: str) -> dict[str, Any] | None:
        """The request of a redraw turn, known by its message (``redraw`` writes "Draw image N again:
        <that image's prompt>"), else None: a redraw that starts again draws, it is not re-planned."""
        found = re.match(r"Draw image (\d+) again: ", prompt)
        images = self._images() if found else []
        number = int(found.group(1)) if found else 0
        if not 1 <= number <= len(images):
            return None
        again, request = _redraw(number, images[number - 1])
        return request if again == prompt else None

    def resume(self, *, stop: Any = None) -> Iterator[dict[str, Any]]:
        """Continue the unfinished last turn from its last checkpoint, yielding its events.
        Raises ``SessionStateError`` when nothing is pending. ``stop``: as for ``Agent.graph_events``."""
        with self._writing(), self.agent.store.lease():
            turn = self.sessions.unfinished_turn(self.id)
            if turn is None:
                raise SessionStateError(f"session {self.id!r} has no unfinished turn; nothing to resume")
            self.sessions.set_turn_status(self.id, turn.id, "running")
            try:
                refs = [ImageRef.model_validate(r) for r in turn.inputs or []]
            except ValidationError:
                raise StorageError(
                    f"session {self.id!r} turn {turn.number}: its stored uploads are malformed; it was changed "
                    "outside duogen (cancel the turn with --discard)"
                ) from None
            graph_input = None
            if self._at_start(turn.base_checkpoint_id):
                # Interrupted before its first checkpoint, or a cancel cut short after it reverted the
                # state: nothing of the turn is in the state, so it starts again from its message
                # (committing the state as it is would store the previous turn's answer as this one's).
                graph_input = self.agent.input_state(turn.prompt, turn.mode, refs, turn.seed)
                if (request := self._redraw_request(turn.prompt)) is not None:
                    graph_input["request"] = request
            yield from self._drive(turn.id, graph_input, turn.prompt, turn.mode, refs, stop=stop)

    def _at_start(self, base: str | None) -> bool:
        """Whether the session's graph state is where a turn that began at checkpoint ``base`` (``None``:
        no state) began: that checkpoint, or a copy of it (same channel versions). ``cancel`` reverts
        the state by copying the base, then marks the turn cancelled in a second transaction; a process
        killed between the two leaves the turn unfinished over a copy."""
        base = base if isinstance(base, str) and base else None  # a tampered value names no checkpoint
        current = self.db.saver.get_tuple(self._config())
        if current is None or base is None:
            return current is None and base is None
        start = self.db.saver.get_tuple(self._config(base))
        # A base that is no turn's start (a tampered record naming the state itself, in the middle of
        # this turn) is not where it began: the turn goes on from its state, not from its message again.
        return start is not None and _same_state(current, start) and self._finished(start)

    def _finished(self, checkpoint: Any) -> bool:
        """Whether the graph had finished at ``checkpoint`` (nothing left to run): where a turn begins."""
        return not self.graph.get_state(self._config(checkpoint.config["configurable"]["checkpoint_id"])).next

    def _began_at(self, start: Any) -> bool:
        """Whether checkpoint ``start`` (one of this session's) is where its unfinished turn began, as
        far as the checkpoints tell. A turn begins at the session's last checkpoint, where the graph had
        finished (the previous turn's end, a fork's copy, the copy a cancel made of a turn's start), and
        its message writes the first checkpoint of its own on top of it (``source`` "input"). So
        ``start`` is a finished state, and the state is still there (or at a copy of it: same channel
        versions), or the first "input" checkpoint on the way back from the state comes right after it
        (or after a copy of it: a cancel cut short, then the turn started again). A record naming an
        earlier turn's start, or a checkpoint inside a turn, fails; going back there would drop
        answered turns from the state, or leave half a turn in it."""
        if not self._finished(start):
            return False
        current = self.db.saver.get_tuple(self._config())
        if current is not None and _same_state(current, start):
            return True
        # The walk reads the turn's own checkpoints only: it stops at the turn's first one, whatever
        # the record names.
        seen: set[str] = set()
        while current is not None:
            checkpoint_id = current.config["configurable"]["checkpoint_id"]
            if checkpoint_id in seen:  # parents that go round: changed outside duogen
                return False
            seen.add(checkpoint_id)
            parent = self.db.saver.get_tuple(current.parent_config) if current.parent_config else None
            if current.metadata.get("source") == "input":
                return parent is not None and _same_state(parent, start)
            current = parent
        return False

    def cancel(self) -> bool:
        """Drop the unfinished last turn: the graph state goes back to where the turn began and the
        turn is marked ``cancelled``. Returns whether there was one. Raises ``StorageError`` (and
        changes nothing) when the turn's record names no state to go back to that exists."""
        with self._writing():
            turn = self.sessions.unfinished_turn(self.id)
            if turn is None:
                return False
            where = f"session {self.id!r} turn {turn.number}"
            advice = "it was changed outside duogen; resume the turn, or export or delete the session"
            base = turn.base_checkpoint_id or None
            if base is not None:
                start = self.db.saver.get_tuple(self._config(base)) if isinstance(base, str) else None
                if start is None:
                    raise StorageError(
                        f"{where}: the stored record is malformed (the checkpoint it started from, "
                        f"{str(base)[:64]!r}, does not exist); {advice}"
                    )
                if not self._began_at(start):
                    raise StorageError(
                        f"{where}: the stored record is malformed (the checkpoint it started from, {base[:64]!r}, "
                        f"is not where the turn began; going back to it would undo other turns); {advice}"
                    )
                self.graph.update_state(self._config(base), None, as_node="__copy__")
            else:
                # No state before the turn: only true while no earlier turn was answered (the state
                # of the answered ones would go with the thread).
                if self.sessions.answered_before(self.id, turn.number):
                    raise StorageError(
                        f"{where}: the stored record is malformed (it names no checkpoint to start from, "
                        f"though earlier turns were answered); {advice}"
                    )
                self.db.saver.delete_thread(self.id)
            self.sessions.set_turn_status(self.id, turn.id, "cancelled")
            self.agent.forget(self.id)
            return True


def _same_state(a: Any, b: Any) -> bool:
    """Whether checkpoint tuples ``a`` and ``b`` hold one state: the same checkpoint, or a copy of it
    (``update_state(..., as_node="__copy__")`` keeps the channel versions)."""
    if a.config["configurable"].get("checkpoint_id") == b.config["configurable"].get("checkpoint_id"):
        return True
    return a.checkpoint["channel_versions"] == b.checkpoint["channel_versions"]


def _redraw(number: int, old: Any) -> tuple[str, dict[str, Any]]:
    """The message and the direct request of a turn that draws image ``number`` (block ``old``) again."""
    request = {
        "prompt": old.prompt,
        "references": list(old.references),
        "kind": old.kind,
        "origin": "draft" if old.origin == "draft" else "generated",
        "step": old.step,
        "attempt": 1,
        "seed": 0,
    }
    return f"Draw image {number} again: {old.prompt}", request
