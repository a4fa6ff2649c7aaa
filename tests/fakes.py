"""Small test doubles for graph-logic tests. The features themselves are proven with real models."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from duogen_agents.models.planner import ChatTurn, PlannerOutput


class ScriptedPlanner:
    """Returns scripted actions in order; a callable entry is called with (conversation, schema)."""

    def __init__(self, script: Sequence[Any]) -> None:
        self.script = list(script)
        self.calls: list[tuple[Sequence[ChatTurn], dict[str, Any]]] = []

    def generate(self, conversation, schema, *, max_new_tokens=None, seed=None, on_token=None) -> PlannerOutput:
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


class SolidImageTool:
    """Draws a solid colour per call and records what it was given."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def draw(self, prompt: str, *, references=(), seed: int = 0, on_step: Callable[[int, int], None] | None = None):
        self.requests.append({"prompt": prompt, "references": list(references), "seed": seed})
        if on_step:
            on_step(1, 1)
        n = len(self.requests)
        return Image.new("RGB", (16, 16), (n * 40 % 256, 80, 160))
