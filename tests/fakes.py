"""Small test doubles for graph-logic tests. The features themselves are proven with real models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from duogen_agents.models.protocols import ChatTurn, PlannerOutput


class ScriptedPlanner:
    """Returns scripted actions in order; a callable entry is called with (conversation, schema)."""

    def __init__(self, script: Sequence[Any]) -> None:
        self.script = list(script)
        self.calls: list[tuple[Sequence[ChatTurn], dict[str, Any]]] = []

    def generate(
        self,
        conversation,
        schema,
        *,
        max_new_tokens=None,
        seed=None,
        on_token=None,
        cache_key=None,
        client_schema=False,
    ) -> PlannerOutput:
        self.calls.append((conversation, schema))
        if not self.script:
            raise AssertionError("the scripted planner ran out of actions")
        item = self.script.pop(0)
        if callable(item):
            item = item(conversation, schema)
        text = item if isinstance(item, str) else json.dumps(item)
        if on_token:
            on_token(text)
        return PlannerOutput(text=text, num_tokens=max(1, len(text) // 4))


class FailingImageTool:
    """Raises on the ``fail_on``-th draw (1-based), to interrupt a turn mid-way."""

    def __init__(self, fail_on: int, inner: SolidImageTool | None = None) -> None:
        self.fail_on = fail_on
        self.inner = inner or SolidImageTool()
        self.calls = 0

    def draw(self, prompt: str, **kwargs: Any):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("the GPU fell over (simulated)")
        return self.inner.draw(prompt, **kwargs)


class SolidImageTool:
    """Draws a solid colour per call and records what it was given."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def draw(
        self,
        prompt: str,
        *,
        kind: str = "generate",
        references=(),
        seed: int = 0,
        on_step: Callable[[int, int], None] | None = None,
    ):
        self.requests.append({"prompt": prompt, "kind": kind, "references": list(references), "seed": seed})
        if on_step:
            on_step(1, 1)
        # The colour depends on the request, so different requests give different images (and ids).
        h = hashlib.sha256(f"{prompt}|{seed}|{len(self.requests)}".encode()).digest()
        return Image.new("RGB", (16, 16), (h[0], h[1], h[2]))
