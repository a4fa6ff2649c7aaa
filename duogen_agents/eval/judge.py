"""Judges: a model that scores an answer on DuoGen's axes under a JSON schema (1-10 and a reason).

- ``PlannerJudge``: a local preset's planner (transformers, grammar-constrained like every action).
- ``OpenAIJudge``: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, OpenAI), given by
  URL and model; the schema goes in ``response_format`` (``json_schema``), images as data URLs.

Scores are normalised to [0, 1] as ``(score - 1) / 9`` in the results; the raw score and the reason
are kept.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from duogen_agents.document import InterleavedDocument
from duogen_agents.errors import ConfigError, GenerationError
from duogen_agents.eval import prompts
from duogen_agents.graphs.actions import max_action_tokens
from duogen_agents.storage.images import ImageStore

HTTP_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 10.0


class Judge(Protocol):
    name: str

    def judge(
        self, request: str, docs: Sequence[InterleavedDocument], store: ImageStore
    ) -> dict[str, tuple[int, str]]: ...


def _answer_parts(docs: Sequence[InterleavedDocument], store: ImageStore) -> list[tuple[str, Any]]:
    """The answer as ("text", str) and ("image", PIL image) parts in order."""
    parts: list[tuple[str, Any]] = []
    for doc in docs:
        for block in doc.blocks:
            if block.type == "text":
                parts.append(("text", block.text))
            else:
                parts.append(("image", store.open(block.image)))
    return parts


def _parse(raw: str, where: str) -> dict[str, tuple[int, str]]:
    """The judge's answer; anything but an integer score from 1 to 10 and a reason per axis is refused."""
    try:
        data = json.loads(raw)
        out = {}
        for axis in prompts.JUDGE_AXES:
            value, reason = data[axis]["score"], data[axis]["reason"]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
                raise ValueError(f"{axis}: score {value!r} is not a whole number from 1 to 10")
            out[axis] = (value, str(reason)[: prompts.REASON_CHARS * 2])
        return out
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        raise GenerationError(f"the judge ({where}) did not answer under the schema: {e}") from None


class PlannerJudge:
    """A local planner as the judge (``--judge PRESET``)."""

    def __init__(self, planner: Any, name: str, spec: str | None = None) -> None:
        self.planner = planner
        self.name = name
        self.spec = spec  # the preset it came from, to resume a run with the same judge
        self.model = None

    @classmethod
    def from_preset(cls, preset: str, home: Any = None) -> PlannerJudge:
        from pathlib import Path

        from duogen_agents.models.remote import build_planner
        from duogen_agents.presets import load_preset
        from duogen_agents.storage.images import default_home

        spec = load_preset(preset)
        root = Path(home) if home is not None else default_home()
        return cls(build_planner(spec.planner, spec.models_path(root)), f"preset:{spec.name}", preset)

    def judge(self, request: str, docs: Sequence[InterleavedDocument], store: ImageStore) -> dict[str, tuple[int, str]]:
        content: list[Any] = [{"type": "text", "text": prompts.JUDGE_REQUEST.format(request=request)}]
        for kind, value in _answer_parts(docs, store):
            content.append({"type": "text", "text": value} if kind == "text" else {"type": "image", "image": value})
        content.append({"type": "text", "text": prompts.JUDGE_AXES_PROMPT})
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": prompts.JUDGE_SYSTEM}]},
            {"role": "user", "content": content},
        ]
        schema = prompts.judge_schema()
        out = self.planner.generate(conversation, schema, max_new_tokens=max_action_tokens(schema), seed=0)
        return _parse(out.text, self.name)


class OpenAIJudge:
    """A judge behind an OpenAI-compatible endpoint (``--judge http://host:port/v1 --judge-model M``)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, transport: Any = None) -> None:
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge URL {base_url!r} must start with http:// or https://")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = base_url.rstrip("/")
        self.spec = base_url
        self.api_key_env = api_key_env  # the variable's name (never its value), to resume with the same key
        self.model = model
        self.name = f"{self.url} ({model})"
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=HTTP_TIMEOUT_S, transport=transport)

    def probe(self) -> None:
        """Before the first model loads: an endpoint that cannot be reached is refused in seconds, not
        after every answer. Any HTTP answer (even 404 for ``/models``) counts as reachable."""
        import httpx

        try:
            self.client.get("/models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise ConfigError(f"the judge at {self.url} cannot be reached: {e}") from None

    def judge(self, request: str, docs: Sequence[InterleavedDocument], store: ImageStore) -> dict[str, tuple[int, str]]:
        import httpx

        content: list[dict[str, Any]] = [{"type": "text", "text": prompts.JUDGE_REQUEST.format(request=request)}]
        for kind, value in _answer_parts(docs, store):
            if kind == "text":
                content.append({"type": "text", "text": value})
            else:
                buf = io.BytesIO()
                value.save(buf, format="PNG")
                url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
                content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": prompts.JUDGE_AXES_PROMPT})
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": prompts.JUDGE_SYSTEM}, {"role": "user", "content": content}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "judgement", "schema": prompts.judge_schema(), "strict": True},
            },
            "temperature": 0,
        }
        try:
            response = self.client.post("/chat/completions", json=body)
            response.raise_for_status()
            raw = response.json()["choices"][0]["message"]["content"]
        except httpx.HTTPError as e:
            raise GenerationError(f"the judge at {self.url} failed: {e}") from None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise GenerationError(f"the judge at {self.url} sent an unexpected response: {e}") from None
        return _parse(raw, self.url)


def make_judge(
    spec: str | None, *, model: str | None = None, api_key_env: str | None = None, home: Any = None
) -> Judge | None:
    """``None`` (no judge), an http(s) URL (with ``model``), or a preset name/file (its planner)."""
    if not spec:
        return None
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ConfigError("a judge URL needs --judge-model (the model name the endpoint serves)")
        return OpenAIJudge(spec, model, api_key_env=api_key_env)
    return PlannerJudge.from_preset(spec, home)
