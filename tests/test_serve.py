"""``duogen serve``: the official ``openai`` client and plain HTTP against a real uvicorn server
over the tiny preset's models (loopback only)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

TOKEN = "test-token-1"
SCHEMA = {
    "type": "object",
    "properties": {
        "say": {"type": "string", "pattern": "^[a-z ]+$", "maxLength": 12},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["say", "n"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_agent: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    from duogen_agents.serve.app import ServeSettings, create_app
    from duogen_agents.sessions import Sessions
    from duogen_agents.storage.database import Database

    db = Database.open(f"sqlite:///{tmp_path_factory.mktemp('serve') / 'duogen.db'}", home=tiny_agent.home)
    sessions = Sessions(db, tiny_agent.store)
    settings = ServeSettings(api_keys=(TOKEN, "second-token"), max_body_bytes=2 * 1024 * 1024)
    running = Running(create_app(tiny_agent, sessions, settings))
    running.app = running.server.config.app  # type: ignore[attr-defined]
    yield running
    running.stop()
    db.close()


@pytest.fixture
def client(server: Running) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


def http(server: Running | str, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = server if isinstance(server, str) else server.url
    return httpx.Client(base_url=url, headers=headers, timeout=300)


def png_bytes(color: tuple[int, int, int], size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(color: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(color)).decode()


def json_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# ---- the OpenAI-compatible surface, through the official client ----------------------------------------


def test_models_lists_planner_first(client: Any) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "tiny-image"]


def test_chat_completion_under_a_json_schema(client: Any) -> None:
    messages = [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": data_url((200, 30, 30))}}]},
    ]  # fmt: skip
    r = client.chat.completions.create(
        model="tiny", messages=messages, response_format=json_format(SCHEMA), max_tokens=64, seed=3
    )
    data = json.loads(r.choices[0].message.content)  # random weights, but the grammar holds
    assert set(data) == {"say", "n"} and 0 <= data["n"] <= 9
    assert 1 <= len(data["say"]) <= 12 and set(data["say"]) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 20
    again = client.chat.completions.create(
        model="tiny", messages=messages, response_format=json_format(SCHEMA), max_tokens=64, seed=3
    )
    assert again.choices[0].message.content == r.choices[0].message.content  # seeded


def test_chat_completion_streams_the_same_text(client: Any) -> None:
    args = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], response_format=json_format(SCHEMA),
                max_tokens=64, seed=5)  # fmt: skip
    whole = client.chat.completions.create(**args).choices[0].message.content
    parts, usage, reasons = [], None, []
    for chunk in client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    assert "".join(parts) == whole
    assert len([p for p in parts if p]) > 1  # token by token, not one piece
    assert reasons[-1] == "stop" and usage is not None and usage.completion_tokens > 0


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                    "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two whole numbers.",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"]}}},
]  # fmt: skip


def _streamed_call(client: Any, **args: Any) -> tuple[list[Any], str | None]:
    deltas, reasons = [], []
    for chunk in client.chat.completions.create(**args, stream=True):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            reasons.append(chunk.choices[0].finish_reason)
    return deltas, reasons[-1]


def test_tool_calls_through_the_openai_client(client: Any, tiny_agent: Any, monkeypatch: Any) -> None:
    """``tools`` and ``tool_choice`` were ignored (an OpenAI client got free text and never a call).
    Now a call comes as ``tool_calls`` (arguments under the tool's schema, ``finish_reason``
    ``tool_calls``), streamed as OpenAI streams one (id and name first, then the arguments in pieces);
    the model is told the tools; an agent loop's history (the call, then the tool's result) reads back."""
    seen = []
    real = tiny_agent.planner.generate
    monkeypatch.setattr(
        tiny_agent.planner, "generate", lambda conv, *a, **kw: seen.append(conv) or real(conv, *a, **kw)
    )
    ask = dict(model="tiny", messages=[{"role": "user", "content": "What is 2 + 3?"}], tools=TOOLS, seed=3)
    r = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "add" and set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    told = "".join(p["text"] for p in seen[-1][0]["content"] if p["type"] == "text")
    assert seen[-1][0]["role"] == "system" and "Add two whole numbers." in told

    calls = client.chat.completions.create(**ask, tool_choice="required").choices[0].message.tool_calls
    deltas, reason = _streamed_call(client, **ask, tool_choice="required")
    assert reason == "tool_calls" and sorted({d.index for d in deltas}) == list(range(len(calls)))
    for i, whole in enumerate(calls):  # each call: its id and name first, then its arguments in pieces
        mine = [d for d in deltas if d.index == i]
        assert mine[0].id and mine[0].function.name == whole.function.name
        assert len(mine) > 2 and all(d.id is None and d.function.name is None for d in mine[1:])
        assert "".join(d.function.arguments for d in mine) == whole.function.arguments  # same seed, same call

    history = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]  # fmt: skip
    after = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none", seed=1)
    assert isinstance(after.choices[0].message.content, str) and not after.choices[0].message.tool_calls
    texts = ["".join(p["text"] for p in t["content"]) for t in seen[-1]]
    assert texts == [
        "What is 2 + 3?",
        '{"calls": [{"tool": "add", "arguments": {"a": 2, "b": 3}}]}',
        "Result of tool call call_1: 5",
    ]
    assert [t["role"] for t in seen[-1]] == ["user", "assistant", "user"]
    assert seen[-1][0]["role"] == "user"  # tool_choice none: a text answer, no tools told


def test_parallel_tool_calls_as_openai_has_them(client: Any, tiny_agent: Any, monkeypatch: Any) -> None:
    """An answer held one call at most, and ``parallel_tool_calls`` was ignored. Now an answer may
    hold several calls (default, as OpenAI's), each with its own id and stream index; an assistant
    message with several calls reads back as one answer; ``parallel_tool_calls: false`` holds it to one."""
    seen = []
    real = tiny_agent.planner.generate
    monkeypatch.setattr(
        tiny_agent.planner, "generate", lambda conv, *a, **kw: seen.append(conv) or real(conv, *a, **kw)
    )
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo, and 2 + 3?"}], tools=TOOLS,
               tool_choice="required")  # fmt: skip
    answers = [client.chat.completions.create(**ask, seed=seed).choices[0] for seed in range(6)]
    seed, several = next((s, a) for s, a in enumerate(answers) if len(a.message.tool_calls) > 1)
    assert all(a.finish_reason == "tool_calls" for a in answers)
    calls = several.message.tool_calls
    assert len({c.id for c in calls}) == len(calls) and all(json.loads(c.function.arguments) is not None for c in calls)
    deltas, reason = _streamed_call(client, **ask, seed=seed)
    streamed = ["".join(d.function.arguments for d in deltas if d.index == i) for i in range(len(calls))]
    assert reason == "tool_calls" and streamed == [c.function.arguments for c in calls]

    history = [*ask["messages"], several.message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in calls]
    client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, seed=1)
    (written,) = ["".join(p["text"] for p in t["content"]) for t in seen[-1] if t["role"] == "assistant"]
    assert json.loads(written) == {
        "calls": [{"tool": c.function.name, "arguments": json.loads(c.function.arguments)} for c in calls]
    }
    for s in range(6):
        one = client.chat.completions.create(**ask, seed=s, parallel_tool_calls=False).choices[0].message
        assert len(one.tool_calls) == 1


def test_calls_in_another_layout_are_read_whole_and_sent_once(client: Any, tiny_agent: Any, monkeypatch: Any) -> None:
    """A served planner whose grammar writes a call's keys in another order: the calls that streamed
    stay as they went out, the rest are read whole at the end and sent then, none of them twice."""
    from duogen_agents.models.protocols import PlannerOutput

    raw = '{"calls": [{"tool": "add", "arguments": {"a": 1, "b": 2}}, {"arguments": {"a": 2, "b": 3}, "tool": "add"}]}'

    def generate(conversation: Any, schema: Any, *, on_token: Any = None, **kw: Any) -> PlannerOutput:
        for i in range(0, len(raw), 7):
            if on_token is not None:
                on_token(raw[i : i + 7])
        return PlannerOutput(text=raw, num_tokens=len(raw) // 7 + 1)

    monkeypatch.setattr(tiny_agent.planner, "generate", generate)
    ask = dict(model="tiny", messages=[{"role": "user", "content": "2 + 3?"}], tools=TOOLS, tool_choice="required")
    calls = client.chat.completions.create(**ask).choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("add", {"a": 2, "b": 3})
    ]  # fmt: skip
    deltas, reason = _streamed_call(client, **ask)
    assert reason == "tool_calls" and [d.index for d in deltas if d.id] == [0, 1]
    assert [json.loads("".join(d.function.arguments for d in deltas if d.index == i)) for i in (0, 1)] == [
        {"a": 1, "b": 2}, {"a": 2, "b": 3}
    ]  # fmt: skip


def test_response_format_beside_tools(client: Any) -> None:
    """``response_format`` with ``tools`` was a 400. Now an answer that is not a call is JSON under the
    format's schema (the way LangChain's ProviderStrategy asks an agent's model), streamed as text."""
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Say something, or add"}], tools=TOOLS,
               response_format=json_format(SCHEMA), max_tokens=200)  # fmt: skip
    kinds = set()
    for seed in range(8):
        choice = client.chat.completions.create(**ask, seed=seed).choices[0]
        if choice.message.tool_calls:
            kinds.add("call")
            continue
        kinds.add("answer")
        value = json.loads(choice.message.content)
        assert set(value) == {"say", "n"} and 0 <= value["n"] <= 9 and choice.finish_reason == "stop"
        streamed = client.chat.completions.create(**ask, seed=seed, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content
    assert kinds == {"call", "answer"}, kinds


def test_a_text_answer_beside_tools_and_stop_sequences(client: Any) -> None:
    """With ``tool_choice`` auto a text answer is ``content``, streamed as text; ``stop`` cuts a text
    answer (it was ignored), and ends its decoding."""
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], tools=TOOLS, max_tokens=40)
    seed, text = next(
        (seed, m) for seed in range(12)
        if len((m := client.chat.completions.create(**ask, seed=seed).choices[0].message).content or "") >= 8
    )  # fmt: skip
    assert not text.tool_calls
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**ask, seed=seed, stream=True)
        if c.choices
    ]
    assert "".join(parts) == text.content and len([p for p in parts if p]) > 1
    stop = text.content[4:6]
    cut = client.chat.completions.create(**ask, seed=seed, stop=[stop])
    assert cut.choices[0].message.content == text.content[: text.content.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    free = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=30, seed=2)
    plain = client.chat.completions.create(**free).choices[0].message.content
    stop = plain[5:7]
    stopped = client.chat.completions.create(**free, stop=stop)
    assert (
        stopped.choices[0].message.content == plain[: plain.index(stop)] and stopped.choices[0].finish_reason == "stop"
    )
    assert stopped.usage.completion_tokens < client.chat.completions.create(**free).usage.completion_tokens
    streamed = client.chat.completions.create(**free, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain[: plain.index(stop)]


def test_a_tool_from_the_openai_sdks_pydantic_helper(client: Any) -> None:
    """``openai.pydantic_function_tool`` of a model with a nested one gives ``$ref``s to its ``$defs``:
    they were resolved in the wrapper grammar and refused as a 400."""
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    class Move(BaseModel):
        to: Point

    tool = openai.pydantic_function_tool(Move)
    assert "$ref" in json.dumps(tool)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Go"}], tools=[tool], tool_choice="required", seed=1
    )
    (call,) = r.choices[0].message.tool_calls
    assert Move.model_validate_json(call.function.arguments)


def test_a_response_format_answer_is_json_even_with_control_characters(client: Any) -> None:
    """xgrammar lets raw control characters through a ``maxLength`` string: the content failed
    ``json.loads``. They are escaped (the stream too)."""
    schema = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 4},
              "child": {"type": "string", "maxLength": 4}}, "required": ["label", "child"],
              "additionalProperties": False}  # fmt: skip
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Grow"}], max_tokens=60,
               response_format=json_format(schema))  # fmt: skip
    contents = [client.chat.completions.create(**ask, seed=seed).choices[0].message.content for seed in range(8)]
    assert any("\\u00" in c for c in contents)
    for seed, content in enumerate(contents):
        assert set(json.loads(content)) == {"label", "child"}
        streamed = client.chat.completions.create(**ask, seed=seed, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == content


def test_langchains_chat_openai_calls_tools_on_duogen_serve(server: Running) -> None:
    """The way an agent framework reaches it: ``ChatOpenAI`` pointed at ``duogen serve``, tools bound."""
    langchain_openai = pytest.importorskip("langchain_openai")

    def add(a: int, b: int) -> int:
        """Add two whole numbers."""
        return a + b

    chat = langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, model="tiny", seed=3, max_retries=0)
    model = chat.bind_tools([add], tool_choice="add")
    (call,) = model.invoke("What is 2 + 3?").tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    joined = None
    for piece in model.stream("What is 2 + 3?"):
        joined = piece if joined is None else joined + piece
    assert [(c["name"], c["args"]) for c in joined.tool_calls] == [("add", call["args"])]


def test_tool_requests_it_cannot_honour_are_one_line_400s(server: Running) -> None:
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    bad = [
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "function.name"),
        ({"tools": [TOOLS[1], TOOLS[1]]}, "same name"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "subtract"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"messages": [{"role": "tool", "content": "5"}]}, "tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{not json"}}
                        ],
                    }
                ]
            },
            "not JSON",
        ),  # fmt: skip
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "object"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": ["string"]}}}]}, "object"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"enum": [5]}}}]}, "object"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "add"}}, "tool_choice"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "add", "arguments": "[" * 100_000 + "]" * 100_000},
                            }
                        ],
                    }
                ]
            },
            "not JSON",
        ),  # fmt: skip
    ]
    deep: dict = {"type": "object"}
    node = deep
    for _ in range(250):  # a few KB: it was a 500 (the rebasing of references recursed)
        node["properties"] = {"x": {"type": "object"}}
        node = node["properties"]["x"]
    with http(server) as h:
        r = h.post(
            "/v1/chat/completions",
            json={**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]},
        )
        assert r.status_code == 400 and "\n" not in r.json()["error"]["message"], r.text
        for extra, words in bad:
            r = h.post("/v1/chat/completions", json={**base, **extra})
            assert r.status_code == 400, (extra, r.text)
            message = r.json()["error"]["message"]
            assert words in message and "\n" not in message, (extra, message)


def test_images_generate_and_edit_with_two_references(client: Any) -> None:
    gen = client.images.generate(model="tiny-image", prompt="a red circle", size="96x64", response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode(gen.data[0].b64_json)))
    assert image.size == (96, 64)
    edit = client.images.edit(
        model="tiny-image",
        image=[("a.png", png_bytes((255, 0, 0)), "image/png"), ("b.png", png_bytes((0, 0, 255)), "image/png")],
        prompt="put both in one picture",
    )
    assert Image.open(io.BytesIO(base64.b64decode(edit.data[0].b64_json))).size == (64, 64)


def test_image_edit_kinds_and_refusals(server: Running) -> None:
    files = [("image[]", (f"{i}.png", png_bytes((40 * i, 0, 0)), "image/png")) for i in range(2)]
    with http(server) as h:
        ok = h.post("/v1/images/edits", data={"prompt": "the next moment", "kind": "continue"}, files=files[:1])
        assert ok.status_code == 200, ok.text
        too_many = [("image[]", (f"{i}.png", png_bytes((i, 0, 0)), "image/png")) for i in range(9)]
        refused = h.post("/v1/images/edits", data={"prompt": "x", "kind": "edit"}, files=too_many)
        assert refused.status_code == 400 and "at most" in refused.json()["error"]["message"]
        bad = h.post("/v1/images/edits", data={"prompt": "x"}, files=[("image", ("x.png", b"not a png", "image/png"))])
        assert bad.status_code == 400
        none = h.post("/v1/images/edits", data={"prompt": "x"})
        assert none.status_code == 400 and "image" in none.json()["error"]["message"]


def test_errors_in_the_openai_shape(client: Any, server: Running) -> None:
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}],
            response_format=json_format({"type": "object", "properties": {"a": {"type": "no-such-type"}}}),
        )  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
        )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    big = "x" * (3 * 1024 * 1024)
    with http(server) as h:
        r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": big}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert h.get("/v1/models", headers={"Authorization": ""}).status_code == 401
        assert h.get("/v1/models", headers={"Authorization": "Bearer second-token"}).status_code == 200
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no token


def test_full_queue_answers_429_with_retry_after(server: Running, client: Any) -> None:
    gate = server.app.state.duogen.gates["planner"]  # type: ignore[attr-defined]
    gate.running += gate.concurrency + gate.queue  # as if that many requests were in line
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert int(e.value.response.headers["retry-after"]) >= 1
    finally:
        gate.running -= gate.concurrency + gate.queue
    assert client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    ).choices


def test_gate_queues_then_refuses() -> None:
    from duogen_agents.serve.gate import Gate, QueueFull, Slot

    async def scenario() -> tuple[list[str], int]:
        gate = Gate("planner", concurrency=1, queue=1)
        order: list[str] = []

        async def job(name: str, hold: float) -> None:
            async with Slot(gate):
                order.append(f"start {name}")
                await asyncio.sleep(hold)
                order.append(f"end {name}")

        first = asyncio.create_task(job("a", 0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(job("b", 0.0))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as e:
            await gate.acquire()
        await asyncio.gather(first, second)
        return order, e.value.retry_after

    order, retry_after = asyncio.run(scenario())
    assert order == ["start a", "end a", "start b", "end b"] and retry_after >= 1


# ---- the agent and its sessions -------------------------------------------------------------------------


def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def test_session_turns_documents_and_images(server: Running) -> None:
    with http(server) as h:
        sid = h.post("/v1/sessions", json={"id": "garden"}).json()["id"]
        assert sid == "garden"
        for kwargs in ({}, {"json": {}}):  # no body, or an empty one: a new id
            fresh = h.post("/v1/sessions", **kwargs)
            assert fresh.status_code == 201 and fresh.json()["id"] != sid, fresh.text
        first = h.post(f"/v1/sessions/{sid}/turns", json={"prompt": "Plan a garden", "mode": "visual-plan",
                                                          "images": [data_url((0, 128, 0))]})  # fmt: skip
        assert first.status_code == 200, first.text
        doc = first.json()
        image_ids = [b["image"]["id"] for b in doc["blocks"] if b["type"] == "image"]
        assert image_ids and doc["mode"] == "visual-plan"
        with h.stream("POST", f"/v1/sessions/{sid}/turns", json={"prompt": "Now in winter", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        names = [n for n, _ in events]
        assert names[-2:] == ["document", "end"] and "token" in names and "image_ready" in names
        assert events[-2][1]["document"]["prompt"] == "Now in winter"
        ready = [data for name, data in events if name == "image_ready"]
        assert all("path" not in data and data["image"]["id"] for data in ready)  # ids, no path on the server

        info = h.get(f"/v1/sessions/{sid}").json()
        assert info["turns"] == 2 and [t["prompt"] for t in info["history"]] == ["Plan a garden", "Now in winter"]
        assert sid in [s["id"] for s in h.get("/v1/sessions").json()["data"]]
        png = h.get(f"/v1/images/{image_ids[0]}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)
        assert "<html" in h.get(f"/v1/sessions/{sid}/document", params={"format": "html"}).text.lower()
        md = h.get(f"/v1/sessions/{sid}/document", params={"format": "md"}).text
        assert f"/v1/images/{image_ids[0]}" in md
        assert json.loads(h.get(f"/v1/sessions/{sid}/document").text)["blocks"]

        # an earlier image by id as the next turn's input
        third = h.post(f"/v1/sessions/{sid}/turns", json={"prompt": "Again", "images": [image_ids[0]]})
        assert third.status_code == 200, third.text

        fork = h.post(f"/v1/sessions/{sid}/fork", json={"id": "garden-2"})
        assert fork.status_code == 201 and fork.json()["turns"] == 3
        assert h.delete("/v1/sessions/garden-2").json()["deleted"] is True
        assert h.get("/v1/sessions/garden-2").status_code == 404
        assert h.post(f"/v1/sessions/{sid}/resume", json={}).status_code == 409  # nothing pending
        assert h.post("/v1/sessions", json={"id": sid}).status_code == 409


def test_refused_requests(server: Running) -> None:
    with http(server) as h:
        for bad in ("..%2F..%2Fetc%2Fpasswd", "....", "a" * 63, "A" * 64, "../" + "a" * 64):
            r = h.get(f"/v1/images/{bad}")
            assert r.status_code in (400, 404), (bad, r.status_code)
        assert h.get("/v1/images/" + "0" * 64).status_code == 404
        r = h.get("/v1/sessions/no-such")
        assert r.status_code == 404 and r.json()["error"]["message"] == (
            "no session 'no-such'; GET /v1/sessions lists the sessions"  # not the CLI's advice
        )
        assert h.get("/v1/sessions/bad id!").status_code == 400
        r = h.post("/v1/sessions/s2/turns", json={"prompt": "x", "images": ["/etc/passwd"]})
        assert r.status_code == 400 and "data: URL" in r.json()["error"]["message"]
        r = h.post("/v1/sessions/s2/turns", json={"prompt": "x", "mode": "poem", "stream": True})
        assert r.status_code == 400 and "mode" in r.json()["error"]["message"]
        assert h.get("/v1/sessions/s2").status_code == 404  # nothing was stored
    with http(server, token=None) as h:
        assert h.post("/v1/sessions/s3/turns", json={"prompt": "x"}).status_code == 401
        assert h.get("/v1/images/" + "0" * 64).status_code == 401


def test_cli_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DUOGEN_API_KEY"}
    r = subprocess.run(
        [sys.executable, "-m", "duogen_agents.cli", "serve", "--host", "0.0.0.0", "--port", "9"],
        capture_output=True, text=True, env={**env, "DUOGEN_HOME": str(tmp_path)}, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "DUOGEN_API_KEY" in r.stderr


def test_load_eight_sessions_of_two_turns_on_postgresql(pg_url: str, home: Path, tmp_path: Path) -> None:
    """benchmarks/serve_load.py against a `duogen serve` process on PostgreSQL: nothing lost or doubled."""
    out = tmp_path / "load.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    r = subprocess.run(
        [sys.executable, str(script), "--db", pg_url, "--sessions", "8", "--turns", "2", "--json", str(out),
         "--timeout", "300"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert result["turns_answered"] == 16 and result["lost"] == 0 and result["duplicated"] == 0
    assert result["latency_p95_s"] >= result["latency_p50_s"] > 0 and result["queue_wait_p95_s"] >= 0
    assert "p50" in r.stdout


def test_sigterm_lets_the_running_turn_finish_and_store(home: Path, tmp_path: Path) -> None:
    """Graceful shutdown: a turn streaming when SIGTERM arrives runs to its end and is committed."""
    import signal

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from serve_load import start_server

    db = f"sqlite:///{tmp_path / 'duogen.db'}"
    proc, url = start_server("tiny", db, TOKEN, 2, 300)
    try:
        with http(url) as h:
            body = {"prompt": "Plan a picnic", "mode": "visual-plan", "stream": True}
            with h.stream("POST", "/v1/sessions/graceful/turns", json=body) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("event: "))
                proc.send_signal(signal.SIGTERM)  # mid-turn
                rest = [line for line in lines if line.startswith("event: ")]
        assert first == "event: token" and rest[-2:] == ["event: document", "event: end"]
        # uvicorn shuts down gracefully, then re-raises the signal it caught (its exit status says SIGTERM)
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    from duogen_agents.sessions import Sessions

    sessions = Sessions.open(db, home=home)
    try:
        [turn] = sessions.turns("graceful")
        assert turn.status == "complete" and turn.document.images
    finally:
        sessions.close()


# ---- review findings: hang-ups, pixel bombs, browsers, chunked bodies, shutdown ------------------------


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_hangs_up_gives_its_slot_back(server: Running) -> None:
    state = server.app.state.duogen  # type: ignore[attr-defined]
    with http(server) as h:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stream": True}
        with h.stream("POST", "/v1/chat/completions", json=body) as r:
            next(r.iter_lines())  # the first chunk, then hang up
        with h.stream("POST", "/v1/sessions/hangup/turns", json={"prompt": "Plan a picnic", "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("event: "))
    wait_for(lambda: state.gates["planner"].running == 0 and state.gates["turns"].running == 0)
    wait_for(lambda: (state.sessions.last_turn("hangup") or None) is not None
             and state.sessions.last_turn("hangup").status == "complete")  # fmt: skip
    with http(server) as h:  # and the next requests are served at once
        r = h.post("/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert r.status_code == 200


def test_a_streaming_client_that_hangs_up_ends_its_decode(server: Running, tiny_agent: Any, monkeypatch: Any) -> None:
    """A streamed chat completion whose client hangs up ends its decode at the next piece, freeing the
    device (it decoded on to max_tokens for nobody)."""
    real, decoded = tiny_agent.planner.generate, []
    finished = threading.Event()

    def recorded(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        decoded.append(out.num_tokens)
        finished.set()
        return out

    monkeypatch.setattr(tiny_agent.planner, "generate", recorded)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300, "seed": 3}
    with http(server) as h:
        whole = h.post("/v1/chat/completions", json=body).json()
        assert whole["usage"]["completion_tokens"] >= 200  # the answer runs long when nobody leaves
        finished.clear()
        with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
    assert finished.wait(60)
    assert decoded[-1] < 60, decoded


def test_the_pixels_of_one_request_are_bounded_before_decoding(server: Running) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4200, 4200), (255, 255, 255)).save(buf, format="PNG")  # ~60 KB, 17.6 MP
    flat = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with http(server) as h:
        r = h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": flat}}]}]})  # fmt: skip
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
        r = h.post("/v1/sessions/pixels/turns", json={"prompt": "x", "images": [flat]})
        assert r.status_code == 413
        files = [("image[]", ("a.png", buf.getvalue(), "image/png"))]
        assert h.post("/v1/images/edits", data={"prompt": "x"}, files=files).status_code == 413


def test_a_chunked_body_over_the_limit_is_413(server: Running) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(3):
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    with http(server) as h:
        r = h.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


@pytest.fixture(scope="module")
def open_server(tiny_agent: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A loopback server without tokens, with a browser origin allowed."""
    from duogen_agents.serve.app import ServeSettings, create_app
    from duogen_agents.sessions import Sessions
    from duogen_agents.storage.database import Database

    db = Database.open(f"sqlite:///{tmp_path_factory.mktemp('open') / 'duogen.db'}", home=tiny_agent.home)
    running = Running(create_app(tiny_agent, Sessions(db, tiny_agent.store),
                                 ServeSettings(cors_origins=("http://127.0.0.1:5173",))))  # fmt: skip
    running.app = running.server.config.app  # type: ignore[attr-defined]
    yield running
    running.stop()
    db.close()


def test_without_a_token_only_loopback_names_are_answered(open_server: Running) -> None:
    with http(open_server, token=None) as h:
        assert h.get("/v1/sessions").status_code == 200
        assert h.get("/v1/sessions", headers={"host": f"localhost:{open_server.port}"}).status_code == 200
        rebound = h.get("/v1/sessions", headers={"host": f"attacker.example:{open_server.port}"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
        page = h.post("/v1/images/edits", headers={"origin": "http://attacker.example"}, data={"prompt": "x"})
        assert page.status_code == 403
        assert h.get("/v1/models", headers={"origin": "http://127.0.0.1:5173"}).status_code == 200


def test_cors_preflight_and_refusals_carry_cors_headers(server: Running, tiny_agent: Any, tmp_path: Path) -> None:
    from duogen_agents.serve.app import ServeSettings, create_app
    from duogen_agents.sessions import Sessions
    from duogen_agents.storage.database import Database

    db = Database.open(f"sqlite:///{tmp_path / 'duogen.db'}", home=tiny_agent.home)
    app = create_app(tiny_agent, Sessions(db, tiny_agent.store),
                     ServeSettings(api_keys=(TOKEN,), cors_origins=("http://ui.example",)))  # fmt: skip
    running = Running(app)
    try:
        origin = {"origin": "http://ui.example"}
        with http(running.url, token=None) as h:
            pre = h.options("/v1/models", headers={**origin, "access-control-request-method": "GET",
                                                    "access-control-request-headers": "authorization"})  # fmt: skip
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
            denied = h.get("/v1/models", headers=origin)
            assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://ui.example"
            ok = h.get("/v1/models", headers={**origin, "authorization": f"Bearer {TOKEN}"})
            assert ok.status_code == 200
    finally:
        running.stop()
        db.close()


def test_shutdown_stops_a_running_turn_after_its_step_and_it_resumes(tiny_agent: Any, tmp_path: Path) -> None:
    """At shutdown, new turns get 503; after the grace a running turn stops after its step, is left
    interrupted, and resume finishes it (on any server over the same database)."""
    from duogen_agents.serve.app import ServeSettings, create_app
    from duogen_agents.sessions import Sessions
    from duogen_agents.storage.database import Database

    db_url = f"sqlite:///{tmp_path / 'duogen.db'}"
    db = Database.open(db_url, home=tiny_agent.home)
    first = Running(create_app(tiny_agent, Sessions(db, tiny_agent.store), ServeSettings()))
    state = first.server.config.app.state.duogen
    try:
        with http(first.url, token=None) as h:
            body = {"prompt": "Plan a picnic", "mode": "visual-plan", "stream": True}
            with h.stream("POST", "/v1/sessions/stopped/turns", json=body) as r:
                lines = r.iter_lines()
                next(line for line in lines if line == "event: image_ready")  # a step or two done
                state.begin_shutdown(0.0)
                events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
            assert events[-1]["error"]["code"] == "turn_stopped"
            refused = h.post("/v1/sessions/other/turns", json={"prompt": "x"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "closing"
    finally:
        first.stop()
    sessions = Sessions(db, tiny_agent.store)
    assert [t.status for t in sessions.turns("stopped")] == ["interrupted"]
    second = Running(create_app(tiny_agent, sessions, ServeSettings()))
    try:
        with http(second.url, token=None) as h:
            r = h.post("/v1/sessions/stopped/resume", json={})
            assert r.status_code == 200, r.text
            assert [b for b in r.json()["blocks"] if b["type"] == "image"]
        assert [t.status for t in sessions.turns("stopped")] == ["complete"]
    finally:
        second.stop()
        db.close()


def test_a_remote_models_address_is_withheld_from_clients(tiny_agent: Any, tmp_path: Path) -> None:
    """A failed remote model's error names its address to the operator (``Agent.run``, the CLI, the
    server's log) and never to the server's clients: HTTP errors, the stored turn's
    error in a session's history, the OpenAI-compatible surface, MCP tool errors (a stream's error
    event is the same ``api_error`` line)."""
    import re

    from duogen_agents import Agent
    from duogen_agents.errors import GenerationError
    from duogen_agents.models.remote import WITHHELD, withhold_upstreams, withhold_urls
    from duogen_agents.presets import Preset, load_preset
    from duogen_agents.serve.app import ServeSettings, create_app
    from duogen_agents.serve.mcp import _one_line
    from duogen_agents.sessions import Sessions
    from duogen_agents.storage.database import Database

    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    base = load_preset("tiny").model_dump()
    remote = {**base["planner"], "backend": "openai", "base_url": url, "model": "m", "max_retries": 0, "timeout_s": 5}
    agent = Agent.from_preset(Preset.model_validate({**base, "planner": remote}), home=tiny_agent.home)
    with pytest.raises(GenerationError, match=re.escape(f"cannot reach the planner at {url}")):
        agent.run("Plan a picnic")

    def withheld(message: str) -> bool:
        return WITHHELD in message and str(port) not in message and "127.0.0.1" not in message

    db = Database.open(f"sqlite:///{tmp_path / 'duogen.db'}", home=agent.home)
    running = Running(create_app(agent, Sessions(db, agent.store), ServeSettings()))
    try:
        with http(running.url, token=None) as h:
            r = h.post("/v1/sessions/picnic/turns", json={"prompt": "Plan a picnic"})
            assert r.status_code == 500 and withheld(r.json()["error"]["message"]), r.text
            assert r.json()["error"]["message"].startswith(f"cannot reach the planner at {WITHHELD}")
            body = {"prompt": "Plan a picnic", "stream": True}
            with h.stream("POST", "/v1/sessions/streamed/turns", json=body) as s:  # fails before its first event
                assert s.status_code == 500 and withheld(json.loads(s.read())["error"]["message"])
            history = h.get("/v1/sessions/picnic").json()["history"]
            assert history and all(withheld(t["error"]) for t in history), history
            model = h.get("/v1/models").json()["data"][0]["id"]
            chat = h.post(
                "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
            )
            assert chat.status_code == 500 and withheld(chat.json()["error"]["message"]), chat.text
    finally:
        running.stop()
        db.close()
    assert withheld(_one_line(GenerationError(f"cannot reach the planner at {url}: refused"), "sqlite"))
    assert withhold_upstreams("127.0.0.10 and 127.0.0.1.") == f"127.0.0.10 and {WITHHELD}."  # whole names only
    # a stored error of another process, whose remote models this one does not know: any address
    assert withhold_urls("GenerationError: cannot reach the planner at HTTP://gpu-7:8000/v1 (x)") == (
        f"GenerationError: cannot reach the planner at {WITHHELD} (x)"
    )
    assert withhold_urls("HTTPConnectionPool(host='gpu-7', port=8000): 10.0.0.9:8000, gpu-7:8000; 12:30") == (
        f"HTTPConnectionPool(host='{WITHHELD}', port=8000): {WITHHELD}, {WITHHELD}; 12:30"
    )


def test_hostile_chat_requests_are_one_line_400s_and_the_server_lives(
    server: Running, tiny_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schemas that would exhaust memory, text that cannot be stored or tokenized, conversations longer
    than the context: each a 400 in the OpenAI shape before any model runs (or, for a client's schema,
    decoded token by token: xgrammar's jump-forward search has no bound)."""

    def no_jump(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a client's schema went through jump forward")

    monkeypatch.setattr(tiny_agent.planner, "_jump", no_jump)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    recursive = {"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
                                                       "required": ["x"]}}}  # fmt: skip
    with http(server) as h:
        # A required self-reference: no finite answer, its forced text endless. Cut by max_tokens.
        r = h.post("/v1/chat/completions", json={**chat, "response_format": json_format(recursive)})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith('{"x":')

        def refused(body: dict[str, Any], match: str, code: str | None = None, raw: str | None = None) -> None:
            if raw is not None:
                r = h.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            else:
                r = h.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (r.status_code, r.text)
            error = r.json()["error"]
            assert match in error["message"] and "\n" not in error["message"], error
            if code is not None:
                assert error["code"] == code

        for pattern in ("^a{100000000}$", "^(a{500}){500}$", "^\\\\{100000}$", "^a{3000}b{3000}$"):
            refused({**chat, "response_format": json_format({"type": "string", "pattern": pattern})}, "expands to")
        refused(
            {**chat, "response_format": json_format({"type": "string", "pattern": "^(a"})}, "not a regular expression"
        )
        email = {"type": "string", "pattern": "^[a-z]{1,64}@[a-z]{1,255}\\.[a-z]{2,63}$"}  # ordinary: admitted
        r = h.post("/v1/chat/completions", json={**chat, "response_format": json_format(email)})
        assert r.status_code == 200, r.text
        refused({**chat, "response_format": json_format({"type": "integer", "minimum": 10**30})}, "grammar")
        error = h.post("/v1/chat/completions", json={**chat, "response_format": json_format(
            {"type": "integer", "minimum": 10**30})}).json()["error"]["message"]  # fmt: skip
        assert "/project/" not in error and ".cc:" not in error  # xgrammar's log prefix dropped
        refused({**chat, "messages": [{"role": "assistant", "content": None}]}, "none has content")
        refused({**chat, "messages": [{"role": "user", "content": "hel\u0000lo"}]}, "NUL")
        raw = '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
        refused({}, "not valid text", raw=raw)
        words = tiny_agent.planner.context_tokens + 100
        refused(
            {**chat, "messages": [{"role": "user", "content": "word " * words}]}, "context", "context_length_exceeded"
        )
        long_stream = {**chat, "stream": True, "messages": [{"role": "user", "content": "word " * words}]}
        refused(long_stream, "context", "context_length_exceeded")  # before the stream starts, too
        # Starlette's own answers, in the OpenAI shape too
        r = h.get("/v1/no-such-route")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = h.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"
        r = h.post("/v1/images/edits", files={"image": ("a.png", png_bytes((0, 0, 0)))}, data={"prompt": "x", "n": "9"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "n: Input should be less than or equal to 4"
        assert h.get("/health").json()["status"] == "ok"


def test_session_routes_refuse_clearly(server: Running) -> None:
    with http(server) as h:
        r = h.post("/v1/sessions/k1/turns", json={"prompt": "hel\u0000lo"})
        assert r.status_code == 400 and "NUL" in r.json()["error"]["message"]
        r = h.post("/v1/sessions/k1/turns", json={"prompt": "hi", "seed": True})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("seed:")
        r = h.post("/v1/sessions/k1/turns")
        assert r.status_code == 400 and r.json()["error"]["message"] == "a JSON request body is required"
        assert h.get("/v1/sessions/k1").status_code == 404  # nothing was stored
        assert h.post("/v1/sessions/k1/turns", json={"prompt": "Show a pot"}).status_code == 200
        assert h.post("/v1/sessions/k2/turns", json={"prompt": "Show a cup"}).status_code == 200
        for target in ("k1", "k2"):  # itself (it once answered a false "busy"), or another that exists
            r = h.post("/v1/sessions/k1/fork", json={"id": target})
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_exists", r.text
        r = h.post("/v1/sessions/k1/resume")  # no body, as fork and new sessions take
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_state"
        assert len(h.get("/v1/sessions/k1").json()["history"]) == 1


def test_a_busy_session_is_worded_for_http_clients(tmp_path: Path) -> None:
    from duogen_agents.serve.app import api_error
    from duogen_agents.storage.database import Database

    db = Database.open(f"sqlite:///{tmp_path / 'd.db'}", home=tmp_path)
    try:
        err = db._busy("s1", "pid 4242")
        assert "--wait" in str(err) and "4242" in str(err)  # the CLI's line
        answer = api_error(err)
        assert answer.status == 409 and answer.code == "session_busy"
        assert answer.message == "session 's1' is busy: another turn is writing it; try again when it finishes"
    finally:
        db.close()


def test_an_unknown_session_is_worded_for_http_clients(tmp_path: Path) -> None:
    """An unknown session's 404 gave the CLI's advice (`duogen sessions list`); an HTTP client is told
    the route that lists them. The CLI keeps its line."""
    from duogen_agents.errors import SessionNotFoundError
    from duogen_agents.serve.app import api_error
    from duogen_agents.sessions import Sessions

    sessions = Sessions.open(f"sqlite:///{tmp_path / 'd.db'}", home=tmp_path)
    try:
        for read in (sessions.get, sessions.delete, sessions.fork):  # the repository's and the archive's error
            with pytest.raises(SessionNotFoundError) as caught:
                read("ghost")
            assert "`duogen sessions list`" in str(caught.value)  # the CLI's line
            answer = api_error(caught.value)
            assert answer.status == 404 and answer.code == "session_not_found"
            assert answer.message == "no session 'ghost'; GET /v1/sessions lists the sessions"
    finally:
        sessions.close()


def test_the_servers_reading_of_cut_and_odd_answers_matches_the_chat_models() -> None:
    """An answer cut after a streamed call in another layout kept nothing on the server (its raw JSON
    came back as content), and ``{"calls": []}`` read whole was an IndexError (a 500)."""
    from duogen_agents.models.chat_model import _ToolTurn
    from duogen_agents.models.protocols import PlannerOutput
    from duogen_agents.serve.openai_api import _answer

    def answer(raw: str) -> tuple[dict, str]:
        reader = _ToolTurn([], None, None)
        reader.feed(raw)
        return _answer(PlannerOutput(text=raw, num_tokens=9, complete=False), reader, [], 100)

    message, reason = answer('{"calls": [{"tool": "add", "arguments": {"a": 1}}, {"arguments": {"a"')
    assert reason == "length" and [c["function"]["arguments"] for c in message["tool_calls"]] == ['{"a": 1}']
    assert answer('{"calls": []}') == ({"content": ""}, "length")
