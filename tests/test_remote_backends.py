"""Remote backends chosen in a preset: the planner on an OpenAI-compatible chat server
(``backend = "openai"``) and the image tool on an OpenAI Images endpoint (``backend = "openai-images"``).

A small fake server (FastAPI + uvicorn on a loopback port, in a thread) answers ``/v1/models``,
``/v1/chat/completions`` (plain and SSE streaming, with an action that matches the schema it was sent),
``/v1/images/generations`` and ``/v1/images/edits`` (multipart); it can be told to fail with a status a
few times, to answer invalid JSON or a mismatching action, or to hang, or to misbehave as servers and
proxies do (keepalive comments and nothing else, a body dripping a byte at a time, malformed JSON, an
HTML page). The real client code runs against it: the whole agent in visual-plan mode, streaming,
retries, timeouts and errors.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from duogen_agents import ConfigError, load_preset
from duogen_agents.errors import GenerationError, ModelLoadError
from duogen_agents.graphs.actions import check_schema, next_action_schema, plan_schema, step_schema, text_schema
from duogen_agents.presets import ImageSpec, PlannerSpec

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402

from duogen_agents.models.images.remote import OpenAIImagesTool  # noqa: E402
from duogen_agents.models.remote import OpenAIPlanner, build_planner, schema_problem  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fake-vl"
IMAGE_MODEL = "fake-dit"


# ---- the fake server -------------------------------------------------------------------------------------


def example(schema: Any) -> Any:
    """A value that matches ``schema``: the last ``anyOf`` branch (image requests with references come
    last), as many distinct references as allowed, the fewest other items, short strings."""
    if "anyOf" in schema:
        return example(schema["anyOf"][-1])
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {k: example(v) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        items = schema.get("items", {})
        if "enum" in items:  # references: as many different images as allowed
            return items["enum"][: schema.get("maxItems", len(items["enum"]))]
        return [example(items) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "a fake answer"[: schema.get("maxLength", 100)]
    if kind == "integer":
        return schema.get("minimum", 1)
    return None


def png_b64(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Fake:
    """What the server does next, and what it was sent."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.fail: list[int] = []  # statuses to answer with first, one per request
        self.fail_body: tuple[str, str] | None = None  # (content type, body) of those, else JSON
        self.retry_after: str | None = None  # their Retry-After (else retry-after-ms: 10)
        self.fail_after = 0.0  # seconds before each of those
        # ok | invalid_json | mismatch | hang, or a misbehaviour: keepalive | empty_deltas | drip | bad_event |
        # not_utf8 | html | no_message | cut | echo_key | endless
        self.chat = "ok"
        self.image = "ok"  # ok | drip
        self.models: tuple[str, bytes] | None = None  # (content type, body) of /v1/models, else the list
        self.chats: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.attempts = 0
        self.stopping = False


def make_app(fake: Fake) -> Any:
    app = FastAPI()

    def failure() -> Any:
        fake.attempts += 1
        if fake.fail:
            status = fake.fail.pop(0)
            # retry-after-ms keeps the client's backoff short in tests (it honours the header).
            wait = {"retry-after": fake.retry_after} if fake.retry_after else {"retry-after-ms": "10"}
            if fake.retry_after == "none":  # the client's own backoff decides
                wait = {}
            if fake.fail_body is not None:
                return Response(fake.fail_body[1], status, wait, media_type=fake.fail_body[0])
            return JSONResponse({"error": {"message": f"fake status {status}"}}, status, wait)
        return None

    def dawdle(piece: bytes, every: float = 0.05, seconds: float = 6.0) -> Any:
        """``piece`` again and again, for a while: a keepalive comment, a byte of a body."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not fake.stopping:
            yield piece
            time.sleep(every)

    @app.get("/v1/models")
    async def models() -> Any:
        if fake.models is not None:
            return Response(fake.models[1], media_type=fake.models[0])
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        fake.headers.append(dict(request.headers))
        if fake.fail and fake.fail_after:
            await asyncio.sleep(fake.fail_after)
        if (bad := failure()) is not None:
            return bad
        body = await request.json()
        fake.chats.append(body)
        if fake.chat == "hang":
            for _ in range(100):
                if fake.stopping:
                    break
                await asyncio.sleep(0.05)
        schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema")
        if schema is None:
            schema = (body.get("structured_outputs") or {}).get("json") or body.get("guided_json")
        stream = bool(body.get("stream"))
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        if fake.chat == "keepalive" and stream:
            return StreamingResponse(dawdle(b": ping\n\n"), media_type="text/event-stream")
        if fake.chat == "empty_deltas" and stream:
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}
            return StreamingResponse(dawdle(f"data: {json.dumps(chunk)}\n\n".encode()), media_type="text/event-stream")
        if fake.chat == "endless" and stream:  # text that flows and never finishes (max_tokens ignored)
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
            return StreamingResponse(
                dawdle(f"data: {json.dumps(chunk)}\n\n".encode(), every=0.005), media_type="text/event-stream"
            )
        if fake.chat == "drip" and not stream:
            return StreamingResponse(dawdle(b" "), media_type="application/json")
        if fake.chat == "bad_event" and stream:
            return StreamingResponse(iter([b"data: {not json\n\n"]), media_type="text/event-stream")
        if fake.chat == "not_utf8":
            chunk = {**base, "choices": [{"index": 0, "delta": {"content": "@@"}, "finish_reason": None}]}
            data = json.dumps(chunk).encode().replace(b"@@", b"\xff\xfe")
            if stream:
                return StreamingResponse(iter([b"data: " + data + b"\n\n"]), media_type="text/event-stream")
            return Response(data, media_type="application/json")
        if fake.chat == "html":  # a proxy's login page, with 200, to either kind of request
            return Response("<html><body><h1>Sign in</h1></body></html>", media_type="text/html")
        if fake.chat == "no_message" and not stream:
            return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": None, "finish_reason": "stop"}]}  # fmt: skip
        if fake.chat == "echo_key":
            return JSONResponse({"error": {"message": f"invalid key {request.headers['authorization']}"}}, 401)
        if fake.chat == "invalid_json":
            text = '{"title": "cut'
        elif fake.chat == "mismatch":
            text = json.dumps({"unexpected": True})
        elif schema is None:
            text = "free text"
        else:
            text = json.dumps(example(schema))
        usage = {"prompt_tokens": 33, "completion_tokens": 17, "total_tokens": 50}
        if not body.get("stream"):
            return {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            }

        def events() -> Any:
            pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
            for piece in pieces:
                delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                yield f"data: {json.dumps({**base, 'choices': [delta]})}\n\n"
            if fake.chat == "cut":  # the connection closes mid-answer: no finish_reason, no [DONE]
                return
            end = {"index": 0, "delta": {}, "finish_reason": "stop"}
            yield f"data: {json.dumps({**base, 'choices': [end]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def image_answer(size: str, n_refs: int) -> dict[str, Any]:
        w, h = (int(x) for x in size.split("x"))
        return {"created": 0, "data": [{"b64_json": png_b64((w, h), (40 * n_refs % 256, 120, 200))}]}

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Any:
        fake.headers.append(dict(request.headers))
        if (bad := failure()) is not None:
            return bad
        body = await request.json()
        fake.images.append({"endpoint": "generations", **body})
        if fake.image == "drip":
            return StreamingResponse(dawdle(b" "), media_type="application/json")
        return image_answer(body["size"], 0)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Any:
        if (bad := failure()) is not None:
            return bad
        form = await request.form()
        files = form.getlist("image[]")
        sizes = [Image.open(io.BytesIO(await f.read())).size for f in files]  # type: ignore[union-attr]
        record = {k: v for k, v in form.items() if k != "image[]"}
        fake.images.append({"endpoint": "edits", "n_images": len(files), "image_sizes": sizes, **record})
        return image_answer(str(form["size"]), len(files))

    return app


@pytest.fixture(scope="module")
def server() -> Any:
    fake = Fake()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(fake), log_level="error", timeout_graceful_shutdown=2, lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.02)
    fake.url = f"http://127.0.0.1:{port}/v1"  # type: ignore[attr-defined]
    yield fake
    fake.stopping = True
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture()
def fake(server: Fake) -> Fake:
    server.reset()
    return server


def planner_spec(url: str, **over: Any) -> PlannerSpec:
    fields: dict[str, Any] = {"backend": "openai", "base_url": url, "max_retries": 2, "timeout_s": 20.0}
    return PlannerSpec(**{**fields, **over})


def image_spec(url: str, **over: Any) -> ImageSpec:
    fields: dict[str, Any] = {"backend": "openai-images", "base_url": url, "width": 64, "height": 48}
    return ImageSpec(**{**fields, **over})


def conversation(*images: Image.Image) -> list[dict[str, Any]]:
    user: list[dict[str, Any]] = [{"type": "text", "text": "Plan a picnic. "}]
    user += [{"type": "image", "image": im} for im in images]
    return [
        {"role": "system", "content": [{"type": "text", "text": "You plan."}]},
        {"role": "user", "content": user},
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the whole agent ---------------------------------------------------------------------------------------


def remote_preset(tmp_path: Path, url: str) -> Path:
    preset = {
        "name": "remote",
        "planner": {"backend": "openai", "base_url": url, "max_new_tokens": 2048, "max_text_chars": 60},
        "image": {"backend": "openai-images", "base_url": url, "model": IMAGE_MODEL, "width": 64, "height": 48},
        "limits": {"max_images": 3, "plan_min_steps": 3, "plan_max_steps": 3, "max_turn_tokens": 8192},
        "seed": 5,
    }
    path = tmp_path / "remote.json"
    path.write_text(json.dumps(preset))
    return path


def test_remote_preset_runs_a_visual_plan(fake: Fake, tmp_path: Path) -> None:
    from duogen_agents import Agent

    agent = Agent.from_preset(remote_preset(tmp_path, fake.url), home=tmp_path / "home")  # type: ignore[attr-defined]
    assert isinstance(agent.planner, OpenAIPlanner) and agent.planner.model_name == MODEL  # from /v1/models
    assert isinstance(agent.image_tool, OpenAIImagesTool)

    doc = agent.run("How do I repot a plant?", mode="visual-plan")

    images = [b for b in doc.blocks if b.type == "image"]
    assert len(images) == 3 and {b.family for b in images} == {"openai-images"}
    assert {b.pipeline for b in images} == {IMAGE_MODEL}
    for b in images:
        assert agent.store.open(b.image.id).size == (64, 48)
    # The first step draws from text; the later ones keep the earlier pictures (multipart image[]).
    assert [r["endpoint"] for r in fake.images] == ["generations", "edits", "edits"]
    assert [r.get("n_images", 0) for r in fake.images] == [0, 1, 2]
    assert all(r["size"] == "64x48" and r["response_format"] == "b64_json" for r in fake.images)
    assert all(r["model"] == IMAGE_MODEL for r in fake.images)
    assert all(s == (64, 48) for r in fake.images for s in r.get("image_sizes", []))
    assert [b.references for b in images][2] == [images[0].image.id, images[1].image.id]

    # Every planner call: the served model, the schema as a strict json_schema response_format, a seed.
    assert fake.chats and all(c["model"] == MODEL for c in fake.chats)
    for c in fake.chats:
        fmt = c["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert "schema" in fmt["json_schema"] and isinstance(c["seed"], int)
        assert c["stream"] is True and c["stream_options"] == {"include_usage": True}
    # The pictures it drew come back to the planner as base64 PNG data URLs.
    urls = [
        p["image_url"]["url"]
        for c in fake.chats
        for m in c["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]
    assert urls and all(u.startswith("data:image/png;base64,") for u in urls)


def test_a_remote_agent_imports_no_model_library(fake: Fake, tmp_path: Path) -> None:
    path = remote_preset(tmp_path, fake.url)  # type: ignore[attr-defined]
    code = f"""
        import sys
        from duogen_agents import Agent
        agent = Agent.from_preset({str(path)!r}, home={str(tmp_path / "home")!r})
        doc = agent.run("Plan a picnic", mode="visual-plan")
        heavy = sorted(m for m in ("torch", "transformers", "diffusers", "xgrammar") if m in sys.modules)
        print("IMAGES", sum(b.type == "image" for b in doc.blocks), "HEAVY", heavy)
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "IMAGES 3 HEAVY []" in proc.stdout, proc.stdout


# ---- the planner -------------------------------------------------------------------------------------------


def test_streaming_calls_on_token_per_delta_and_reports_usage(fake: Fake) -> None:
    planner = build_planner(planner_spec(fake.url, model="served-name"))  # type: ignore[attr-defined]
    assert isinstance(planner, OpenAIPlanner)
    schema = plan_schema(min_steps=2, max_steps=4, max_title=20)
    tokens: list[str] = []
    out = planner.generate(
        conversation(Image.new("RGB", (8, 8), "red")), schema, max_new_tokens=300, seed=11, on_token=tokens.append
    )
    assert len(tokens) > 1 and "".join(tokens) == out.text
    assert json.loads(out.text) == example(schema)
    assert (out.num_tokens, out.prompt_tokens) == (17, 33)
    sent = fake.chats[-1]
    assert sent["model"] == "served-name" and sent["max_tokens"] == 300 and sent["seed"] == 11
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"][0] == {"role": "system", "content": "You plan."}
    parts = sent["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    png = base64.b64decode(parts[1]["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (8, 8)
    assert fake.headers[-1]["authorization"] == "Bearer EMPTY"  # never OPENAI_API_KEY unasked


def test_without_on_token_one_plain_completion(fake: Fake) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url))  # type: ignore[attr-defined]
    schema = check_schema()
    out = planner.generate(conversation(), schema)
    assert json.loads(out.text) == {"verdict": "ok", "note": "a fake answer"}
    assert (out.num_tokens, out.prompt_tokens) == (17, 33)
    assert "stream" not in fake.chats[-1] and fake.chats[-1]["max_tokens"] == planner.spec.max_new_tokens
    free = planner.generate(conversation(), None)  # free text: no schema, nothing to check
    assert free.text == "free text" and "response_format" not in fake.chats[-1]


def test_on_token_returning_true_ends_the_stream(fake: Fake) -> None:
    """A caller that has what it wants (``ChatDuogen``'s stop sequence) returns True: the stream is
    closed there, and each delta so far counts as a token (the usage comes at the stream's end). Any
    other value (a ``write``'s count) goes on."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url))  # type: ignore[attr-defined]
    pieces: list[str] = []
    out = planner.generate(conversation(), None, on_token=lambda t: pieces.append(t) or True)
    assert pieces == ["free "] and out.text == "free " and out.num_tokens == 1 and out.complete
    whole = planner.generate(conversation(), None, on_token=len)
    assert whole.text == "free text" and whole.num_tokens == 17


def test_chat_duogen_over_a_served_planner_streams_a_call_and_a_text_answer(fake: Fake) -> None:
    """``ChatDuogen`` over a server's planner: a call streams as ``tool_call_chunks`` as the server's
    deltas arrive (name first, then the arguments in pieces), and a text answer as text; joined, they
    are ``invoke``'s message."""
    from duogen_agents.models.chat_model import ChatDuogen

    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        return "sunny"

    chat = ChatDuogen(planner=OpenAIPlanner.from_spec(planner_spec(fake.url)))  # type: ignore[attr-defined]
    chunks = list(chat.bind_tools([get_weather], tool_choice="any").stream("Weather in Oslo?"))
    pieces = [c.tool_call_chunks[0] for c in chunks if c.tool_call_chunks]
    assert pieces[0]["name"] == "get_weather" and len(pieces) > 3
    joined = chunks[0]
    for c in chunks[1:]:
        joined = joined + c
    assert [(c["name"], c["args"]) for c in joined.tool_calls] == [("get_weather", {"city": "a fake answer"})]
    text = list(chat.bind_tools([get_weather], tool_choice="auto").stream("Hello"))
    assert [c.content for c in text if c.content] == ["a fak", "e ans", "wer"]  # as the server's deltas came
    # no tokenizer here: LangChain's estimate (its default fetched GPT-2's tokenizer from the hub)
    from langchain_core.messages import HumanMessage
    from langchain_core.messages.utils import count_tokens_approximately

    messages = [HumanMessage("Weather in Oslo?")]
    assert chat.get_num_tokens_from_messages(messages) == count_tokens_approximately(messages) > 0
    assert chat.get_num_tokens("Weather in Oslo?") == 4  # four characters a token
    with pytest.raises(NotImplementedError, match="on its server"):  # its ids are the server's to know
        chat.get_token_ids("Weather in Oslo?")


@pytest.mark.parametrize("field", ["structured_outputs", "guided_json"])
def test_vllm_structured_output_fields(fake: Fake, field: str) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, structured_output=field))  # type: ignore[attr-defined]
    schema = check_schema()
    planner.generate(conversation(), schema, on_token=lambda _t: None)
    sent = fake.chats[-1]
    assert "response_format" not in sent
    assert (sent["structured_outputs"]["json"] if field == "structured_outputs" else sent["guided_json"]) == schema


def test_retries_503_then_succeeds(fake: Fake) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, max_retries=2))  # type: ignore[attr-defined]
    fake.fail = [503, 503]
    out = planner.generate(conversation(), check_schema(), on_token=lambda _t: None)
    assert json.loads(out.text)["verdict"] == "ok" and fake.attempts == 3


def test_429_past_the_retries_is_one_clear_line(fake: Fake) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, max_retries=1))  # type: ignore[attr-defined]
    fake.fail = [429, 429, 429]
    with pytest.raises(GenerationError) as err:
        planner.generate(conversation(), check_schema())
    msg = str(err.value)
    assert fake.attempts == 2 and "\n" not in msg
    assert f"the planner at {fake.url} answered HTTP 429 (tried 2 times): fake status 429" == msg  # type: ignore[attr-defined]


def test_invalid_json_is_a_clear_error(fake: Fake) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL))  # type: ignore[attr-defined]
    fake.chat = "invalid_json"
    with pytest.raises(
        GenerationError, match=f"the planner at {fake.url} .* returned an invalid action: not valid JSON"
    ):  # type: ignore[attr-defined]
        planner.generate(conversation(), check_schema(), on_token=lambda _t: None)
    fake.chat = "mismatch"
    with pytest.raises(GenerationError, match="does not match the action schema .*lacks the required key 'verdict'"):
        planner.generate(conversation(), check_schema())


def test_a_hanging_server_times_out(fake: Fake) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=0.5, max_retries=0))  # type: ignore[attr-defined]
    fake.chat = "hang"
    start = time.monotonic()
    with pytest.raises(GenerationError, match=f"the planner at {fake.url} did not answer within 0.5 s"):  # type: ignore[attr-defined]
        planner.generate(conversation(), check_schema(), on_token=lambda _t: None)
    assert time.monotonic() - start < 4
    fake.stopping = True  # let the handler go


def test_server_down_is_one_line_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelLoadError) as err:  # the model lookup, when the preset names none
        OpenAIPlanner.from_spec(planner_spec(url, max_retries=0))
    assert str(err.value).startswith(f"cannot reach the planner server at {url}: ") and "\n" not in str(err.value)
    assert "set planner.model" in str(err.value)
    planner = OpenAIPlanner.from_spec(planner_spec(url, model=MODEL, max_retries=1))  # no request yet
    with pytest.raises(GenerationError) as err2:
        planner.generate(conversation(), check_schema(), on_token=lambda _t: None)
    msg = str(err2.value)
    assert msg.startswith(f"cannot reach the planner at {url} (tried 2 times): ") and "is the server running" in msg
    tool = OpenAIImagesTool.from_spec(image_spec(url, model=IMAGE_MODEL, max_retries=0))
    with pytest.raises(GenerationError, match=f"cannot reach the image server at {url}/images/generations"):
        tool.draw("a pot")


def test_api_key_comes_from_the_named_environment_variable(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DUOGEN_TEST_KEY", raising=False)
    spec = planner_spec(fake.url, model=MODEL, api_key_env="DUOGEN_TEST_KEY")  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="planner.api_key_env names the environment variable DUOGEN_TEST_KEY"):
        OpenAIPlanner.from_spec(spec)
    monkeypatch.setenv("DUOGEN_TEST_KEY", "s3cret")
    OpenAIPlanner.from_spec(spec).generate(conversation(), check_schema())
    assert fake.headers[-1]["authorization"] == "Bearer s3cret"


# ---- the image tool ----------------------------------------------------------------------------------------


def test_image_tool_maps_kinds_to_endpoints(fake: Fake) -> None:
    tool = OpenAIImagesTool.from_spec(image_spec(fake.url, max_references=3))  # type: ignore[attr-defined]
    assert tool.model == MODEL  # the server's first model
    assert dict(tool.capabilities) == {"generate": 3, "edit": 3}
    steps: list[tuple[int, int]] = []
    drawing = tool.draw("a pot", seed=9, on_step=lambda i, n: steps.append((i, n)))
    assert drawing.image.size == (64, 48) and drawing.family == "openai-images" and drawing.pipeline == MODEL
    assert steps == [(1, 1)]
    assert fake.images[-1] == {
        "endpoint": "generations",
        "prompt": "a pot",
        "n": 1,
        "size": "64x48",
        "response_format": "b64_json",
        "model": MODEL,
        "seed": 9,
    }
    refs = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    tool.draw("the pot, repotted", kind="edit", references=refs, seed=3)
    sent = fake.images[-1]
    assert sent["endpoint"] == "edits" and sent["n_images"] == 3 and sent["image_sizes"] == [(64, 48)] * 3
    assert (sent["prompt"], sent["size"], sent["seed"], sent["model"]) == ("the pot, repotted", "64x48", "3", MODEL)
    with pytest.raises(GenerationError, match="cannot continue with references"):
        tool.draw("next", kind="continue", references=refs[:1])
    with pytest.raises(GenerationError, match="at most 3 reference"):
        tool.draw("too many", kind="generate", references=refs * 2)
    both = OpenAIImagesTool.from_spec(image_spec(fake.url, kinds=["edit", "continue"], extra_body={"steps": 4}))  # type: ignore[attr-defined]
    assert dict(both.capabilities) == {"edit": 4, "continue": 4}
    both.draw("next", kind="continue", references=refs[:1])
    assert fake.images[-1]["endpoint"] == "edits" and fake.images[-1]["steps"] == "4"


def test_image_server_errors_name_the_endpoint(fake: Fake) -> None:
    tool = OpenAIImagesTool.from_spec(image_spec(fake.url, model=IMAGE_MODEL, max_retries=0))  # type: ignore[attr-defined]
    fake.fail = [500]
    with pytest.raises(GenerationError, match=f"the image server at {fake.url}/images/generations answered HTTP 500"):  # type: ignore[attr-defined]
        tool.draw("a pot")


# ---- presets -----------------------------------------------------------------------------------------------


def test_remote_preset_validation(tmp_path: Path) -> None:
    def load(text: str) -> Any:
        f = tmp_path / "p.toml"
        f.write_text(text)
        return load_preset(f)

    with pytest.raises(ConfigError, match="planner: .*remote planner needs base_url"):
        load('base = "tiny"\n[planner]\nbackend = "openai"\n')
    with pytest.raises(ConfigError, match="transformers planner needs model"):
        load('base = "tiny"\n[planner]\nbackend = "transformers"\nmodel = ""\n')
    with pytest.raises(ConfigError, match="must start with http"):
        load('base = "tiny"\n[planner]\nbackend = "openai"\nbase_url = "localhost:8000"\n')
    with pytest.raises(ConfigError, match="planner.api_key_env"):
        load('base = "tiny"\n[planner]\nbackend = "openai"\nbase_url = "http://h/v1"\napi_key_env = "not a name"\n')
    with pytest.raises(ConfigError, match="remote image tool needs base_url"):
        load('base = "tiny"\n[image]\nbackend = "openai-images"\n')
    with pytest.raises(ConfigError, match="critic: .*remote planner needs base_url"):
        load('base = "tiny"\n[critic]\nbackend = "openai"\n')

    # A section that switches backend is taken as written: no tiny checkpoint or 64x64 canvas inherited.
    p = load(
        'base = "tiny"\n[planner]\nbackend = "openai"\nbase_url = "http://h:8000/v1"\ntimeout_s = 30\n'
        '[image]\nbackend = "openai-images"\nbase_url = "http://h:8001/v1"\n'
    )
    assert p.planner.model is None and p.planner.timeout_s == 30.0 and p.planner.max_new_tokens == 8192
    assert p.image.family == "cosmos2" and p.image.text2image is None and (p.image.width, p.image.height) == (1280, 704)
    assert p.planner.describe() == "the served model at http://h:8000/v1"
    assert p.image.describe() == "the served model at http://h:8001/v1"
    assert not p.is_tiny
    # A remote planner with a local image family works; offload with remote models is accepted.
    p = load('base = "tiny-flux2"\noffload = true\n[planner]\nbackend = "openai"\nbase_url = "http://h/v1"\n')
    assert p.image.model == "tiny:flux2-klein" and p.offload
    # The aligned family reads the planner's hidden states: it needs a local planner.
    with pytest.raises(ConfigError, match="aligned image family .* needs a local planner"):
        load(
            '[planner]\nbackend = "openai"\nbase_url = "http://h/v1"\n'
            '[image]\nfamily = "aligned"\nmodel = "/somewhere/aligned"\n'
        )


# ---- the schema check --------------------------------------------------------------------------------------


def test_schema_problem_on_the_action_schemas() -> None:
    refs = ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    schema = next_action_schema(refs, max_text=20, max_prompt=20, max_refs=2, allow_image=True, allow_done=True)
    assert schema_problem({"type": "done"}, schema) is None
    assert schema_problem({"type": "text", "text": "two\nlines"}, schema) is None  # an escape the pattern admits
    assert schema_problem({"type": "image", "prompt": "p", "references": refs, "kind": "edit"}, schema) is None
    assert "matches none" in str(schema_problem({"type": "image", "prompt": "p", "references": ["zzz"]}, schema))
    assert "longer than 20" in str(schema_problem("x" * 21, text_schema(20)))
    assert "pattern" in str(schema_problem("bad\x01char", text_schema(20)))
    step = step_schema(refs, max_text=30, max_prompt=30, max_refs=2)
    assert schema_problem(example(step), step) is None
    assert "not allow" in str(schema_problem({**example(step), "extra": 1}, step))
    assert schema_problem(1, {"const": True}) is not None and schema_problem(True, {"const": True}) is None
    assert schema_problem(True, {"type": "integer"}) is not None
    assert schema_problem(3, {"type": "integer", "minimum": 1, "maximum": 10}) is None
    assert schema_problem(11, {"type": "integer", "minimum": 1, "maximum": 10}) is not None
    defs = {
        "$defs": {"Step": {"type": "object", "required": ["title"]}},
        "type": "array",
        "items": {"$ref": "#/$defs/Step"},
    }
    assert schema_problem([{"title": "a"}], defs) is None and schema_problem([{}], defs) is not None


ROOT = Path(__file__).resolve().parents[1]


def _readme_toml(first_line: str) -> str:
    """The README's TOML block that starts with ``first_line``."""
    text = (ROOT / "README.md").read_text()
    for block in text.split("```toml\n")[1:]:
        body = block.split("```", 1)[0]
        if body.startswith(first_line):
            return body
    raise AssertionError(f"no TOML block starting with {first_line!r} in README.md")


def test_the_readme_example_preset_validates(tmp_path: Path) -> None:
    f = tmp_path / "remote.toml"
    f.write_text(_readme_toml("# remote.toml"))
    p = load_preset(f)
    assert (p.planner.backend, p.image.backend, p.planner.timeout_s) == ("openai", "openai-images", 120.0)
    assert p.image.extra_body == {"num_inference_steps": 4, "guidance_scale": 1.0}


@pytest.mark.parametrize("name", ["worker.toml", "duogen-backends.toml"])
def test_the_scale_out_presets_validate(name: str) -> None:
    p = load_preset(ROOT / "examples" / "scale-out" / name)
    assert (p.planner.backend, p.image.backend) == ("openai", "openai-images")
    assert p.planner.base_url and p.image.base_url and p.planner.api_key_env


def test_a_remote_critic_checks_the_images(fake: Fake, tmp_path: Path) -> None:
    from duogen_agents import Agent

    path = remote_preset(tmp_path, fake.url)  # type: ignore[attr-defined]
    data = json.loads(path.read_text())
    data["critic"] = {"backend": "openai", "base_url": fake.url, "model": "critic-vl"}  # type: ignore[attr-defined]
    path.write_text(json.dumps(data))
    agent = Agent.from_preset(path, home=tmp_path / "home")
    assert isinstance(agent.critic, OpenAIPlanner) and agent.critic.role == "critic"
    doc = agent.run("Plan a picnic", mode="visual-plan")
    assert sum(b.type == "image" for b in doc.blocks) == 3
    checks = [c for c in fake.chats if c["model"] == "critic-vl"]
    assert len(checks) == 3  # one verdict per image, each shown the image
    assert all("verdict" in c["response_format"]["json_schema"]["schema"]["properties"] for c in checks)
    assert all(
        any(p["type"] == "image_url" for m in c["messages"] if isinstance(m["content"], list) for p in m["content"])
        for c in checks
    )


def test_a_served_models_context_error_is_prompt_too_long() -> None:
    """So the graph leaves out the oldest turns with a remote planner too (duogen serve's and OpenAI's
    code, vLLM's wording)."""
    from types import SimpleNamespace

    from duogen_agents.models.remote import _context_exceeded

    ours = SimpleNamespace(body={"error": {"code": "context_length_exceeded", "message": "..."}})
    vllm = RuntimeError("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens")
    other = SimpleNamespace(body={"error": {"code": "invalid_value", "message": "bad seed"}})
    assert _context_exceeded(ours) and _context_exceeded(vllm) and not _context_exceeded(other)


# ---- misbehaving servers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", ["keepalive", "empty_deltas"])
def test_a_stream_that_does_not_move_fails_within_timeout_s(fake: Fake, chat: str) -> None:
    """Keepalive comments (``: ping``) or empty deltas, and nothing else: each keeps the socket busy, so
    the client's read timeout never fires; the stream must move within timeout_s."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=0.5, max_retries=2))  # type: ignore[attr-defined]
    fake.chat = chat
    start = time.monotonic()
    with pytest.raises(GenerationError) as err:
        planner.generate(conversation(), check_schema(), on_token=lambda _t: None)
    assert time.monotonic() - start < 2
    assert str(err.value) == (
        f"the planner at {fake.url} did not answer within 0.5 s; check the server, or raise timeout_s in the preset"  # type: ignore[attr-defined]
    )


def test_a_stream_that_flows_past_max_tokens_is_ended(fake: Fake) -> None:
    """A flowing stream is held to its quiet time, not the deadline; one that keeps flowing past
    max_tokens (a server that ignores it, or loops) is ended there, not after the server's 6 s."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=0.5, max_retries=0))  # type: ignore[attr-defined]
    fake.chat = "endless"
    seen: list[str] = []
    start = time.monotonic()
    with pytest.raises(GenerationError) as err:
        planner.generate(conversation(), None, max_new_tokens=20, on_token=seen.append)
    assert time.monotonic() - start < 3
    assert str(err.value) == (
        f"the planner at {fake.url} went on streaming past max_tokens = 20 (more than 56 text deltas); "  # type: ignore[attr-defined]
        "check that the server honours max_tokens"
    )
    assert len(seen) == 56


def test_a_dripping_body_fails_at_the_calls_deadline(fake: Fake) -> None:
    """A body that comes a byte at a time never trips a read timeout: the call's deadline,
    timeout_s x (max_retries + 1), ends it, for the planner and for the image tool."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=0.4, max_retries=1))  # type: ignore[attr-defined]
    fake.chat = "drip"
    start = time.monotonic()
    with pytest.raises(GenerationError, match=f"^the planner at {fake.url} did not answer within 0.8 s;"):  # type: ignore[attr-defined]
        planner.generate(conversation(), check_schema())
    assert time.monotonic() - start < 2.5
    tool = OpenAIImagesTool.from_spec(image_spec(fake.url, model=IMAGE_MODEL, timeout_s=0.4, max_retries=1))  # type: ignore[attr-defined]
    fake.image = "drip"
    start = time.monotonic()
    with pytest.raises(GenerationError, match=f"^the image server at {fake.url}/images/generations did not answer"):  # type: ignore[attr-defined]
        tool.draw("a pot")
    assert time.monotonic() - start < 2.5


def test_a_retry_after_wait_is_cut_to_timeout_s(fake: Fake) -> None:
    """The client would wait the 5 s a 429 asks for (it honours up to two minutes): a call waits at
    most timeout_s, and not at all where that would take it past its deadline (it fails with the 429)."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=0.5, max_retries=2))  # type: ignore[attr-defined]
    fake.fail, fake.retry_after = [429], "5"
    start = time.monotonic()
    out = planner.generate(conversation(), check_schema())
    assert json.loads(out.text)["verdict"] == "ok" and fake.attempts == 2
    assert 0.4 < time.monotonic() - start < 2
    # Each 429 after 0.7 s: the first at 0.7 (2.3 s left of 3: a wait of 1 s), the second at 2.4 (0.6 s left).
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=1.0, max_retries=2))  # type: ignore[attr-defined]
    fake.attempts, fake.fail, fake.fail_after = 0, [429] * 4, 0.7
    start = time.monotonic()
    with pytest.raises(GenerationError) as err:
        planner.generate(conversation(), check_schema())
    assert time.monotonic() - start < 3 and fake.attempts == 2
    assert str(err.value) == f"the planner at {fake.url} answered HTTP 429 (tried 2 times): fake status 429"  # type: ignore[attr-defined]


def test_a_slow_reader_of_the_stream_is_not_the_servers_silence(fake: Fake) -> None:
    """A caller that takes longer than timeout_s with a piece (a slow callback) does not make a
    healthy stream time out: its quiet time counts from when the caller is done."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=0.5, max_retries=0))  # type: ignore[attr-defined]
    slow = [0.6]  # the first piece only: the next read comes 0.6 s after the server sent it
    out = planner.generate(conversation(), check_schema(), on_token=lambda _t: time.sleep(slow.pop() if slow else 0))
    assert json.loads(out.text)["verdict"] == "ok"


def test_the_clients_own_backoff_is_held_to_the_deadline_too(fake: Fake) -> None:
    """Without a Retry-After the client backs off 0.5, 1, 2, 4 s (less up to a quarter): four retries
    of a 503 with timeout_s = 1 spent more than the call's 5 s and failed as a timeout; each wait is now
    at most timeout_s, so the fifth attempt answers."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, timeout_s=1.0, max_retries=4))  # type: ignore[attr-defined]
    fake.fail, fake.retry_after = [503] * 4, "none"
    start = time.monotonic()
    out = planner.generate(conversation(), check_schema())
    assert json.loads(out.text)["verdict"] == "ok" and fake.attempts == 5
    assert time.monotonic() - start < 4.5


@pytest.mark.parametrize(
    ("chat", "streamed", "problem"),
    [
        ("bad_event", True, "an event that is not JSON"),
        ("not_utf8", True, "an event that is not UTF-8 text"),
        ("not_utf8", False, "a body that is not UTF-8 text"),
        ("html", False, "a body that is not JSON (text/html; charset=utf-8): 'Sign in'"),
        ("html", True, "a body of text/html; charset=utf-8 to a streamed request, not text/event-stream"),
        ("no_message", False, "its first choice has no message"),
    ],
)
def test_a_malformed_answer_is_one_line_naming_the_server(fake: Fake, chat: str, streamed: bool, problem: str) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, max_retries=0))  # type: ignore[attr-defined]
    fake.chat = chat
    with pytest.raises(GenerationError) as err:
        planner.generate(conversation(), check_schema(), on_token=(lambda _t: None) if streamed else None)
    assert str(err.value).startswith(f"the planner at {fake.url} sent a malformed response: {problem}")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("models", "problem"),
    [
        (
            ("text/html", b"<html><body>Welcome to nginx</body></html>"),
            "a body that is not JSON (text/html; charset=utf-8): 'Welcome to nginx'",
        ),
        (("application/json", b'{"object": "list", "data": "nope"}'), "no list of models in its 'data'"),
        (("application/json", b'{"object": "list", "data": [{"object": "model"}]}'), "a model without an id"),
    ],
)
def test_a_malformed_model_list_is_one_line(fake: Fake, models: tuple[str, bytes], problem: str) -> None:
    fake.models = models
    with pytest.raises(ModelLoadError) as err:
        OpenAIPlanner.from_spec(planner_spec(fake.url, max_retries=0))  # type: ignore[attr-defined]
    assert str(err.value).startswith(
        f"the planner server at {fake.url} sent a malformed response at /models: {problem}"
    )  # type: ignore[attr-defined]
    assert str(err.value).endswith("(set planner.model in the preset to skip this lookup)")


def test_a_stream_cut_before_its_finish_reason_is_an_error(fake: Fake) -> None:
    """A stream that stops without a finish_reason (and without [DONE]) lost the rest of its answer; one
    the caller stopped (on_token returned True) did not."""
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL))  # type: ignore[attr-defined]
    fake.chat = "cut"
    with pytest.raises(
        GenerationError, match=f"^the planner at {fake.url}: the stream ended before the answer finished"
    ):  # type: ignore[attr-defined]
        planner.generate(conversation(), None, on_token=lambda _t: None)
    out = planner.generate(conversation(), None, on_token=lambda _t: True)
    assert out.text == "free " and out.complete


def test_a_base_url_with_credentials_is_refused(tmp_path: Path) -> None:
    """user:password@ in base_url would be in every error line, stored turn and checkpoint that names
    the server: refused when the preset loads (or a spec is made), without showing the password."""
    f = tmp_path / "p.toml"
    f.write_text('base = "tiny"\n[planner]\nbackend = "openai"\nbase_url = "http://user:hunter2@h:8000/v1"\n')
    with pytest.raises(ConfigError, match="carries credentials .* api_key_env") as err:
        load_preset(f)
    assert "hunter2" not in str(err.value) and "'http://h:8000/v1'" in str(err.value)
    with pytest.raises(ValueError, match="carries credentials") as err2:
        image_spec("http://user:hunter2@h:8001/v1")
    assert "hunter2" not in str(err2.value)
    with pytest.raises(ValueError, match="must start with http") as err3:
        planner_spec("ftp://user:hunter2@h/v1")
    assert "hunter2" not in str(err3.value)


def test_a_key_the_server_echoes_is_not_in_the_error(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error line is stored with the turn: the key the server echoes back is not in it."""
    monkeypatch.setenv("DUOGEN_TEST_KEY", "sk-very-secret-42")
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, api_key_env="DUOGEN_TEST_KEY"))  # type: ignore[attr-defined]
    fake.chat = "echo_key"
    with pytest.raises(GenerationError) as err:
        planner.generate(conversation(), check_schema())
    assert str(err.value) == f"the planner at {fake.url} answered HTTP 401: invalid key Bearer ***"  # type: ignore[attr-defined]


def test_openai_organization_and_project_are_not_read_from_the_environment(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-private")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-private")
    # The client reads these headers at construction too; an Authorization among them replaced the key.
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", "X-Gateway-Key: gw-private\nAuthorization: Bearer sk-private")
    monkeypatch.setenv("SERVER_KEY", "s3cret")
    spec = planner_spec(fake.url, model=MODEL, api_key_env="SERVER_KEY")
    OpenAIPlanner.from_spec(spec).generate(conversation(), check_schema())  # type: ignore[attr-defined]
    sent = {k.lower(): v for k, v in fake.headers[-1].items()}
    assert sent["authorization"] == "Bearer s3cret" and "x-gateway-key" not in sent
    assert "openai-organization" not in sent and "openai-project" not in sent


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (("text/plain", "model not loaded\x1b[0m\r\nretry later"), "model not loaded retry later"),
        (
            (
                "text/html",
                "<html><head><title>400</title><style>h1 {x: y}</style></head><body><h1>Bad &amp; wrong</h1>",
            ),
            "400 Bad & wrong",
        ),
        (("text/plain", "x" * 5000), "x" * 200 + "..."),
    ],
)
def test_a_plain_text_or_html_error_body_is_shown_on_one_line(fake: Fake, body: tuple[str, str], detail: str) -> None:
    planner = OpenAIPlanner.from_spec(planner_spec(fake.url, model=MODEL, max_retries=0))  # type: ignore[attr-defined]
    fake.fail, fake.fail_body = [400], body
    with pytest.raises(GenerationError) as err:
        planner.generate(conversation(), check_schema())
    assert str(err.value) == f"the planner at {fake.url} answered HTTP 400: {detail}"  # type: ignore[attr-defined]
