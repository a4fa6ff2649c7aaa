"""``Agent``: a preset's planner and image tool behind the turn graph, in a few lines.

>>> agent = Agent.from_preset("tiny")                                   # doctest: +SKIP
>>> doc = agent.run("How do I repot a plant?", mode="visual-plan")     # doctest: +SKIP
>>> agent.save(doc, "out/")                                             # doctest: +SKIP

``stream`` yields the same run as events (dicts): ``{"event": "token", "text": ...}`` for planner
tokens, the graph's custom events (``plan``, ``text``, ``image_start``, ``image_progress``,
``image_ready``, ``image_rejected``, ``finish``) and last ``{"event": "document", "document": doc}``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from duogen_agents.document import ImageRef, InterleavedDocument
from duogen_agents.errors import ConfigError
from duogen_agents.graphs.state import MODES
from duogen_agents.presets import Preset, load_preset
from duogen_agents.storage.images import ImageStore, default_home
from duogen_agents.storage.inputs import load_input_image

MAX_PROMPT_CHARS = 20_000


class Agent:
    def __init__(
        self,
        preset: Preset,
        *,
        planner: Any,
        image_tool: Any,
        home: Path | str | None = None,
        checkpointer: Any = None,
    ) -> None:
        from langgraph.checkpoint.memory import InMemorySaver

        from duogen_agents.graphs.turn import GraphDeps, build_graph
        from duogen_agents.models.chat_model import PlannerChatModel
        from duogen_agents.tools.render import Renderer

        self.preset = preset
        self.home = Path(home) if home is not None else default_home()
        self.store = ImageStore(self.home)
        self.planner = planner
        self.image_tool = image_tool
        self.renderer = Renderer(image_tool, self.store)
        self.deps = GraphDeps(
            chat=PlannerChatModel(planner=planner, store=self.store),
            renderer=self.renderer,
            store=self.store,
            planner_spec=preset.planner,
            limits=preset.limits,
        )
        self.checkpointer = checkpointer if checkpointer is not None else InMemorySaver()
        self.graph = build_graph(self.deps, checkpointer=self.checkpointer)

    @classmethod
    def from_preset(cls, preset: str | Path | Preset = "tiny", *, home: Path | str | None = None) -> Agent:
        """Load the preset's planner and image tool (building the tiny checkpoints on first use)."""
        from duogen_agents.models.image_tool import CosmosImageTool
        from duogen_agents.models.loading import quiet_libraries
        from duogen_agents.models.planner import TransformersPlanner

        spec = load_preset(preset)
        root = Path(home) if home is not None else default_home()
        quiet_libraries()
        planner = TransformersPlanner.from_spec(spec.planner, root / "models")
        image_tool = CosmosImageTool.from_spec(spec.image, root / "models")
        return cls(spec, planner=planner, image_tool=image_tool, home=root)

    @property
    def recursion_limit(self) -> int:
        lim = self.preset.limits
        per_image = 2 + 2 * lim.redraw_budget
        return 10 + 2 * lim.max_actions + lim.plan_max_steps * 2 + (lim.max_images + lim.max_drafts) * per_image

    def _inputs(self, prompt: str, mode: str, images: Sequence[str | Path]) -> tuple[dict[str, Any], list[ImageRef]]:
        from langchain_core.messages import HumanMessage

        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError('the prompt is empty; say what you want, e.g. duogen run "How do I repot a plant?"')
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        # Load every image before storing any, so one bad file stores nothing.
        pixels = [load_input_image(p) for p in images]
        refs = [self.store.put(im) for im in pixels]
        content: list[dict[str, Any]] = [{"type": "image", "file_id": r.id, "mime_type": r.mime} for r in refs]
        content.append({"type": "text", "text": prompt})
        state = {
            "messages": [HumanMessage(content=content)],
            "mode": mode,
            "known_images": {r.short: r.model_dump() for r in refs},
        }
        return state, refs

    def stream(
        self,
        prompt: str,
        *,
        mode: str = "interleaved",
        images: Sequence[str | Path] = (),
        seed: int | None = None,
        thread_id: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Run one turn, yielding events; the last event carries the ``InterleavedDocument``."""
        state, refs = self._inputs(prompt, mode, images)
        state["seed"] = self.preset.seed if seed is None else seed
        config: dict[str, Any] = {
            "configurable": {"thread_id": thread_id or uuid.uuid4().hex},
            "recursion_limit": self.recursion_limit,
        }
        for mode_name, payload in self.graph.stream(state, config, stream_mode=["messages", "custom"]):
            if mode_name == "messages":
                chunk, meta = payload
                if isinstance(chunk.content, str) and chunk.content and meta.get("langgraph_node") != "finish":
                    yield {"event": "token", "text": chunk.content, "node": meta.get("langgraph_node")}
            else:
                yield payload
        values = self.graph.get_state(config).values
        doc = InterleavedDocument.model_validate(
            {
                "prompt": prompt,
                "mode": mode,
                "preset": self.preset.name,
                "title": values.get("title"),
                "blocks": values.get("blocks", []),
                "inputs": [r.model_dump() for r in refs],
            }
        )
        yield {"event": "document", "document": doc, "thread_id": config["configurable"]["thread_id"]}

    def run(
        self,
        prompt: str,
        *,
        mode: str = "interleaved",
        images: Sequence[str | Path] = (),
        seed: int | None = None,
    ) -> InterleavedDocument:
        """Run one turn and return its document."""
        doc: InterleavedDocument | None = None
        for event in self.stream(prompt, mode=mode, images=images, seed=seed):
            if event.get("event") == "document":
                doc = event["document"]
        assert doc is not None
        return doc

    def save(self, doc: InterleavedDocument, out_dir: str | Path) -> list[Path]:
        """Write ``document.md``, ``document.html``, ``document.json`` and ``images/`` to ``out_dir``."""
        from duogen_agents.export import write_document

        return write_document(doc, self.store, out_dir)
