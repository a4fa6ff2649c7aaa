"""``Agent``: a preset's planner and image tool behind the turn graph, in a few lines.

>>> agent = Agent.from_preset("tiny")                                   # doctest: +SKIP
>>> doc = agent.run("How do I repot a plant?", mode="visual-plan")     # doctest: +SKIP
>>> agent.save(doc, "out/")                                             # doctest: +SKIP

``stream`` yields the same run as events (dicts): ``{"event": "token", "text": ...}`` for planner
tokens, the graph's custom events (``plan``, ``text``, ``image_start``, ``image_progress``,
``image_ready``, ``image_rejected``, ``finish``) and last ``{"event": "document", "document": doc}``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from duogen_agents.document import ImageRef, InterleavedDocument
from duogen_agents.errors import ConfigError, DuogenError, TurnStoppedError
from duogen_agents.inputs import block_file_id, image_from_block, load_input_image
from duogen_agents.presets import Preset, load_preset
from duogen_agents.storage.images import ImageStore, default_home
from duogen_agents.validation import check_prompt, check_seed

if TYPE_CHECKING:
    from duogen_agents.sessions import Session

log = logging.getLogger(__name__)

# A file path, a PIL image, or an image content block (LangChain standard or OpenAI image_url).
ImageInput = Any


def as_stream_parts(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Events as LangGraph v2 stream parts (``{"type", "ns", "data"}``): planner tokens as
    ``messages`` parts (an ``AIMessageChunk`` and metadata tagged ``duogen:planner``), everything else,
    the final document included, as ``custom`` parts carrying the event dict."""
    from langchain_core.messages import AIMessageChunk

    from duogen_agents.graphs.nodes.common import PLANNER_TAG

    try:
        for event in events:
            if event.get("event") == "token":
                meta = {"langgraph_node": event.get("node"), "tags": [PLANNER_TAG]}
                yield {"type": "messages", "ns": (), "data": (AIMessageChunk(content=event["text"]), meta)}
            else:
                yield {"type": "custom", "ns": (), "data": event}
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()


def last_document(events: Iterator[dict[str, Any]]) -> InterleavedDocument:
    """The document a turn's event stream ends with (running the stream to its end)."""
    doc = None
    for event in events:
        if event.get("event") == "document":
            doc = event["document"]
    assert doc is not None, "the turn's stream ended without a document"
    return doc


async def alast_document(events: AsyncIterator[dict[str, Any]]) -> InterleavedDocument:
    """``last_document`` for an async event stream; the stream is closed however this ends (a
    cancelled caller included), so its turn is marked interrupted and its session free again."""
    doc = None
    async with aclosing(events) as stream:  # type: ignore[type-var]
        async for event in stream:
            if event.get("event") == "document":
                doc = event["document"]
    assert doc is not None, "the turn's stream ended without a document"
    return doc


async def aiterate(events: Iterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """A sync event stream as an async one. Its steps run in one worker thread of their own, one
    after the other, so the event loop stays free. Closing the async iterator, or cancelling the task
    that reads it (``asyncio.wait_for``, a client gone), closes the stream in that thread once its
    step in progress has returned (at the next token or image step: a stream yields often): a
    session's turn is then marked interrupted and its session free again, as with Ctrl-C, before
    the cancellation goes on to the caller."""
    import asyncio
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    # The caller's context (a parent runnable's config and callbacks, tracing) goes with every step,
    # as asyncio.to_thread would carry it: one copy, so what a step sets stays for the next.
    context = contextvars.copy_context()
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duogen-stream")
    try:
        while True:
            event = await asyncio.wrap_future(worker.submit(context.run, next, events, done))
            if event is done:
                return
            yield event  # type: ignore[misc]
    finally:
        closing = worker.submit(context.run, events.close)  # after the step in progress: never inside it
        worker.shutdown(wait=False)
        try:
            await asyncio.shield(asyncio.wrap_future(closing))
        except asyncio.CancelledError:
            raise
        except Exception:  # the stream's own error on closing: the caller's exception (or cancellation) goes on
            log.exception("closing a turn's event stream failed")


class Agent:
    def __init__(
        self,
        preset: Preset,
        *,
        planner: Any,
        image_tool: Any,
        home: Path | str | None = None,
        checkpointer: Any = None,
        critic: Any = None,
        allow_remote_images: bool = False,
    ) -> None:
        from langgraph.checkpoint.memory import InMemorySaver

        from duogen_agents.graphs.deps import GraphDeps
        from duogen_agents.graphs.turn import build_graph
        from duogen_agents.models.chat_model import ChatDuogen
        from duogen_agents.tools.render import Renderer

        self.preset = preset
        self.allow_remote_images = allow_remote_images  # fetch http(s) image URLs (off: refused)
        self.home = Path(home) if home is not None else default_home()
        self.store = ImageStore(self.home)
        self.planner = planner
        self.critic = critic
        self.image_tool = image_tool
        self.renderer = Renderer(image_tool, self.store)
        self.deps = GraphDeps(
            # The same chat model class other code uses (free text, tools, structured output too).
            chat=ChatDuogen(planner=planner, store=self.store, preset=preset.name),
            renderer=self.renderer,
            store=self.store,
            planner_spec=preset.planner,
            limits=preset.limits,
            critic=ChatDuogen(planner=critic, store=self.store, preset=preset.name) if critic is not None else None,
            allow_remote_images=allow_remote_images,
        )
        self.checkpointer = checkpointer if checkpointer is not None else InMemorySaver()
        self.graph = build_graph(self.deps, checkpointer=self.checkpointer)

    @classmethod
    def from_preset(cls, preset: str | Path | Preset = "tiny", *, home: Path | str | None = None) -> Agent:
        """Load the preset's planner and image tool (building the tiny checkpoints on first use)."""
        from duogen_agents.models.images import build_image_tool
        from duogen_agents.models.remote import build_planner

        spec = load_preset(preset)
        root = Path(home) if home is not None else default_home()
        models = spec.models_path(root)
        planner = build_planner(spec.planner, models)
        critic = build_planner(spec.critic, models, role="critic") if spec.critic is not None else None
        if spec.offload:  # each model waits on the CPU before the next loads: the peak is one model
            from duogen_agents.models.residency import offload_image_tool, offload_planner

            for p in (planner, critic):
                if p is not None:
                    offload_planner(p)  # a remote planner has no weights here: skipped
        image_tool = build_image_tool(spec.image, models)
        if hasattr(image_tool, "attach_planner"):  # the aligned family reads the planner's states
            image_tool.attach_planner(planner)
        if spec.offload:
            offload_image_tool(image_tool)  # a remote tool has no weights here: skipped
        return cls(spec, planner=planner, image_tool=image_tool, home=root, critic=critic)

    @property
    def recursion_limit(self) -> int:
        lim = self.preset.limits
        per_image = 2 + 2 * lim.redraw_budget
        return 10 + 2 * lim.max_actions + lim.plan_max_steps * 2 + (lim.max_images + lim.max_drafts) * per_image

    def store_inputs(self, prompt: str, mode: str, images: Sequence[ImageInput]) -> list[ImageRef]:
        """Check the prompt and mode, load every image, then store them (one bad image stores nothing).

        An image is a file path, a PIL image, or a content block: LangChain's standard image blocks
        (``base64``, a ``data:``/``file://`` URL, or the ``file_id`` of an image in the store) and
        OpenAI ``image_url`` parts; an ``http(s)`` URL only with ``allow_remote_images``."""
        check_prompt(prompt)
        from duogen_agents.graphs.state import MODES

        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if problem := self.preset.mode_problem(mode):
            raise ConfigError(problem)
        return [self._stored(im) for im in [self._pixels(i) for i in images]]

    def _pixels(self, image: ImageInput) -> Any:
        from PIL import Image

        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, dict):
            if (file_id := block_file_id(image)) is not None:
                return self.store.open(file_id)  # an id from the caller is validated like any other
            return image_from_block(image, allow_remote=self.allow_remote_images)
        if (
            isinstance(image, str)
            and image[:8].lower().startswith(("http://", "https://", "data:", "file://"))
            and not _is_file(image)  # a file of that name is the file
        ):
            # a URL as a plain string is the URL, as in a block (it was looked for as a file name)
            return image_from_block(
                {"type": "image_url", "image_url": {"url": image}}, allow_remote=self.allow_remote_images
            )
        return load_input_image(image)

    def _stored(self, image: Any) -> ImageRef:
        return self.store.put(image)

    @staticmethod
    def input_state(prompt: str, mode: str, refs: Sequence[ImageRef], seed: int) -> dict[str, Any]:
        """The graph input of one turn: the user's message with its images as ``file_id`` blocks."""
        from langchain_core.messages import HumanMessage

        content: list[dict[str, Any]] = [{"type": "image", "file_id": r.id, "mime_type": r.mime} for r in refs]
        content.append({"type": "text", "text": prompt})
        return {
            "messages": [HumanMessage(content=content)],
            "mode": mode,
            "seed": seed,
            "known_images": {r.short: r.model_dump() for r in refs},
        }

    def graph_events(
        self, graph: Any, graph_input: Any, config: dict[str, Any], *, events: bool = True, stop: Any = None
    ) -> Iterator[dict[str, Any]]:
        """Run ``graph`` (``graph_input=None`` resumes from the last checkpoint), yielding token and
        custom events; ``events=False`` yields none.

        Without events the nodes run in the calling thread. With them, LangGraph runs each node in a
        worker thread so that the caller can take events while it runs, and the two threads share
        the GIL: measured on an H100 at real shapes, that made the planner's eager decode 1.6x
        slower than plain ``generate`` (``benchmarks/visual_plan.py``), so ``run``/``send``, which
        need only the document, ask for no events.

        ``stop`` (a ``threading.Event``): once set, the turn ends after the step that is running, with
        ``TurnStoppedError`` (a server shutting down does this; ``resume`` continues the turn)."""
        from duogen_agents.graphs.nodes.common import PLANNER_TAG

        def check_stop() -> None:
            if stop is not None and stop.is_set():
                raise TurnStoppedError(
                    "the turn was stopped after its last finished step (the server is shutting down); resume it"
                )

        if not events:
            for _ in graph.stream(graph_input, config, stream_mode="updates", durability="sync"):
                check_stop()
            return
        # durability="sync": each step's checkpoint is on disk before the next step starts (crash safety).
        for mode_name, payload in graph.stream(
            graph_input, config, stream_mode=["messages", "custom", "updates"], durability="sync"
        ):
            if mode_name == "updates":  # a step ended
                check_stop()
            elif mode_name == "messages":
                chunk, meta = payload
                # The planner's action tokens only: not the check's verdicts (tagged duogen:check).
                planner = PLANNER_TAG in (meta.get("tags") or [])
                if planner and isinstance(chunk.content, str) and chunk.content:
                    yield {"event": "token", "text": chunk.content, "node": meta.get("langgraph_node")}
            else:
                yield payload

    def document(
        self, values: dict[str, Any], prompt: str, mode: str, refs: Sequence[ImageRef | dict[str, Any]]
    ) -> InterleavedDocument:
        """The turn's ``InterleavedDocument`` from the final graph state."""
        return InterleavedDocument.model_validate(
            {
                "prompt": prompt,
                "mode": mode,
                "preset": self.preset.name,
                "title": values.get("title"),
                "blocks": values.get("blocks", []),
                "inputs": [r.model_dump() if isinstance(r, ImageRef) else r for r in refs],
            }
        )

    def forget(self, session_id: str | None = None) -> None:
        """Drop what the models keep for a session (the planner's KV cache of its conversation), or
        for every session. Sessions do this when a turn is cancelled; a kept cache is only ever
        reused for a conversation whose start is identical, so forgetting frees memory, it never
        changes an answer."""
        for model in (self.planner, self.critic):
            if hasattr(model, "forget"):
                model.forget(session_id)

    def config(self, thread_id: str) -> dict[str, Any]:
        return {"configurable": {"thread_id": thread_id}, "recursion_limit": self.recursion_limit}

    def stream(
        self,
        prompt: str,
        *,
        mode: str = "interleaved",
        images: Sequence[ImageInput] = (),
        seed: int | None = None,
        thread_id: str | None = None,
        version: str = "v1",
    ) -> Iterator[dict[str, Any]]:
        """Run one turn, yielding events; the last event carries the ``InterleavedDocument``.

        Without ``thread_id`` the turn is one-shot: it runs in this agent's checkpointer (in memory
        by default) and its checkpoints are deleted when it ends, finished, failed or closed early.
        With ``thread_id`` they are kept under that id, and the next turn with the same id continues
        the conversation (the document event then carries ``thread_id``). Use ``agent.session(...)``
        for a persisted, resumable conversation. ``version="v2"`` yields the same events as
        LangGraph v2 stream parts (see ``as_stream_parts``).
        """
        if version not in ("v1", "v2"):
            raise ConfigError(f"unknown stream version {version!r}; use v1 (event dicts) or v2 (stream parts)")
        if version == "v2":
            yield from as_stream_parts(self.stream(prompt, mode=mode, images=images, seed=seed, thread_id=thread_id))
            return
        yield from self._turn(prompt, mode, images, seed, thread_id, events=True)

    def _turn(
        self,
        prompt: str,
        mode: str,
        images: Sequence[ImageInput],
        seed: int | None,
        thread_id: str | None,
        *,
        events: bool,
        stop: Any = None,
    ) -> Iterator[dict[str, Any]]:
        check_seed(seed)
        one_shot = not thread_id
        config = self.config(thread_id or uuid.uuid4().hex)
        try:
            with self.store.lease():  # `duogen sessions gc` keeps what this turn writes
                refs = self.store_inputs(prompt, mode, images)
                state = self.input_state(prompt, mode, refs, self.preset.seed if seed is None else seed)
                yield from self.graph_events(self.graph, state, config, events=events, stop=stop)
                doc = self.document(self.graph.get_state(config).values, prompt, mode, refs)
        finally:
            if one_shot:  # nothing can name its thread again
                self._drop_thread(config["configurable"]["thread_id"])
        named = {} if one_shot else {"thread_id": thread_id}
        yield {"event": "document", "document": doc, **named}

    def _drop_thread(self, thread_id: str) -> None:
        """Delete a one-shot turn's checkpoints (finished, failed or closed early): without this each
        ``run`` or tool call kept its whole turn in the checkpointer, under an id nobody knew."""
        try:
            self.graph.checkpointer.delete_thread(thread_id)
        except Exception:  # a saver that cannot delete: the turn's own outcome (or error) goes on
            log.warning("could not delete the checkpoints of one-shot turn %s", thread_id, exc_info=True)

    def session(self, session_id: str | None = None, *, database: Any = None, wait: float | None = None) -> Session:
        """Open (or create on the first turn) a persisted session in ``database`` (a ``Database``, a URL,
        or ``None`` for ``$DUOGEN_DATABASE_URL`` / SQLite in the data directory).

        >>> s = agent.session("balcony")                          # doctest: +SKIP
        >>> s.send("Plan a small balcony garden", mode="visual-plan")  # doctest: +SKIP
        >>> s.send("Redraw step 2 with a blue pot")                # doctest: +SKIP
        """
        from duogen_agents.sessions import Session, Sessions
        from duogen_agents.storage.database import Database

        db = database if isinstance(database, Database) else Database.open(database, home=self.home)
        return Session(self, Sessions(db, self.store), session_id, wait=wait)

    def run(
        self,
        prompt: str,
        *,
        mode: str = "interleaved",
        images: Sequence[ImageInput] = (),
        seed: int | None = None,
    ) -> InterleavedDocument:
        """Run one turn and return its document (no events are produced: the nodes run in this thread)."""
        return last_document(self._turn(prompt, mode, images, seed, None, events=False))

    # ---- async twins ---------------------------------------------------------------------------

    async def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[dict[str, Any]]:
        """``stream`` for asyncio: the same events; model calls run in a worker thread (and take
        turns per device with every other caller), so the event loop stays free."""
        async with aclosing(aiterate(self.stream(prompt, **kwargs))) as events:
            async for event in events:
                yield event

    async def arun(
        self,
        prompt: str,
        *,
        mode: str = "interleaved",
        images: Sequence[ImageInput] = (),
        seed: int | None = None,
    ) -> InterleavedDocument:
        """``run`` for asyncio: the turn runs in a worker thread, so the event loop stays free, and as
        ``run`` produces no events (the planner decodes at full speed: see ``graph_events``).
        Cancelling the caller (a timeout, a client gone) stops the turn after its step in progress."""
        import asyncio
        import threading

        stop = threading.Event()

        def turn() -> InterleavedDocument:
            return last_document(self._turn(prompt, mode, images, seed, None, events=False, stop=stop))

        running = asyncio.ensure_future(asyncio.to_thread(turn))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            stop.set()  # the turn, running in its thread, ends after its step: the caller waits for that
            await asyncio.wait({running})
            if not running.cancelled():
                running.exception()  # retrieved: the turn's TurnStoppedError is the cancellation's own doing
            raise

    def as_tool(self, *, name: str = "illustrated_answer", mode: str = "visual-plan") -> Any:
        """The whole agent as one LangChain tool for other agents: it answers a request with text
        and pictures; the content is text plus standard base64 image blocks (the calling model sees
        the pictures), the artifact the ``InterleavedDocument`` as JSON. ``ainvoke`` runs the turn as
        ``arun`` does: cancelling the caller stops it after the step in progress. Each call is a
        one-shot turn, which keeps no checkpoints once it ends."""
        import asyncio

        from langchain_core.tools import StructuredTool, ToolException
        from pydantic import BaseModel, Field

        agent, default_mode = self, mode

        class IllustratedAnswerArgs(BaseModel):
            request: str = Field(min_length=1, max_length=20_000, description="what to answer, with pictures")
            mode: str = Field(default_mode, description="visual-plan, interleaved or draft")

        def illustrated_answer(request: str, mode: str = default_mode) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            try:
                doc = agent.run(request, mode=mode)
            except DuogenError as e:
                raise ToolException(str(e)) from None
            return doc.content_blocks(agent.store), doc.model_dump(mode="json")

        async def aillustrated_answer(
            request: str, mode: str = default_mode
        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            # As ``arun``: a cancelled caller (a timeout, a client gone) stops the turn after its
            # step in progress; run in an executor, the turn went on to its end unseen.
            try:
                doc = await agent.arun(request, mode=mode)
                blocks = await asyncio.to_thread(doc.content_blocks, agent.store)  # reads the PNGs
            except DuogenError as e:
                raise ToolException(str(e)) from None
            return blocks, doc.model_dump(mode="json")

        return StructuredTool.from_function(
            func=illustrated_answer,
            coroutine=aillustrated_answer,
            name=name,
            description="Answer a request with an illustrated, step-by-step answer: text and images.",
            args_schema=IllustratedAnswerArgs,
            response_format="content_and_artifact",
            handle_tool_error=True,
        )

    def save(self, doc: InterleavedDocument, out_dir: str | Path) -> list[Path]:
        """Write ``document.md``, ``document.html``, ``document.json`` and ``images/`` to ``out_dir``."""
        from duogen_agents.export import write_document

        return write_document(doc, self.store, out_dir)


def _is_file(name: str) -> bool:
    """Whether ``name`` names a file; False for a name no file can have (a long ``data:`` URL is
    longer than a file name may be: ``is_file`` raises there)."""
    try:
        return Path(name).is_file()
    except (OSError, ValueError):
        return False
