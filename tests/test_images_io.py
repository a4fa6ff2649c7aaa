"""Images in as any standard block, out as standard blocks; async twins; the agent as a tool."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from langchain_core.messages import HumanMessage
from PIL import Image

from duogen_agents.errors import InputImageError
from tests.security.helpers import DONE, OK, TEXT, image, scripted_agent


def _png(color=(200, 30, 30), size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _seen(agent) -> list[np.ndarray]:
    """The pixels of every image the planner received in its first call."""
    conversation = agent.planner.calls[0][0]
    return [np.asarray(p["image"]) for t in conversation for p in t["content"] if p["type"] == "image"]


@pytest.fixture
def png_file(tmp_path):
    p = tmp_path / "in.png"
    p.write_bytes(_png((10, 200, 10)))
    return p


def _blocks(png_file, store_ref):
    b64 = base64.b64encode(_png()).decode()
    return {
        "LangChain base64": {"type": "image", "base64": b64, "mime_type": "image/png"},
        "LangChain v0 base64": {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},
        "data: URL": {"type": "image", "url": f"data:image/png;base64,{b64}"},
        "file:// URL": {"type": "image", "url": png_file.as_uri()},
        "OpenAI image_url": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        "store file_id": {"type": "image", "file_id": store_ref.id},
        "PIL image": Image.new("RGB", (48, 48), (200, 30, 30)),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "LangChain base64",
        "LangChain v0 base64",
        "data: URL",
        "file:// URL",
        "OpenAI image_url",
        "store file_id",
        "PIL image",
    ],
)
def test_every_standard_image_block_reaches_the_planner(kind, home, png_file) -> None:
    agent = scripted_agent(home, [TEXT, DONE])
    stored = agent.store.put(Image.new("RGB", (48, 48), (1, 2, 3)))
    block = _blocks(png_file, stored)[kind]
    doc = agent.run("what is this?", images=[block])
    (ref,) = doc.inputs
    (pixels,) = _seen(agent)
    assert np.array_equal(pixels, np.asarray(agent.store.open(ref)))  # the pixels arrived


def test_remote_urls_are_refused_unless_enabled(home) -> None:
    png = _png((0, 0, 250))

    class Serve(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *a) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x.png"
    try:
        upper = url.replace("http://", "HTTP://")  # schemes are case-insensitive
        for image in ({"type": "image", "url": url}, url, upper):  # a block, or the URL as a plain string
            with pytest.raises(InputImageError, match="remote images are off"):
                scripted_agent(home, [TEXT, DONE]).run("x", images=[image])
            agent = scripted_agent(home, [TEXT, DONE])
            agent.allow_remote_images = True
            doc = agent.run("x", images=[image])
            assert np.asarray(agent.store.open(doc.inputs[0]))[0, 0].tolist() == [0, 0, 250]
    finally:
        server.shutdown()
        server.server_close()


def test_a_parent_graphs_base64_message_is_stored_and_seen(home) -> None:
    """Graph input that never went through the Agent (a parent graph's message) still reaches the planner."""
    agent = scripted_agent(home, [image("the same, blue", ["__first__"], "edit"), OK, DONE])
    b64 = base64.b64encode(_png((250, 250, 0))).decode()

    def edit_first(conversation, schema):
        labels = [
            p["text"]
            for t in conversation
            for p in t["content"]
            if p["type"] == "text" and p["text"].startswith("[image ")
        ]
        return {"type": "image", "prompt": "the same, blue", "references": [labels[0][7:-1]], "kind": "edit"}

    agent.planner.script[0] = edit_first
    message = HumanMessage(
        content=[{"type": "image", "base64": b64, "mime_type": "image/png"}, {"type": "text", "text": "make it blue"}]
    )
    config = agent.config("parent-thread")
    out = agent.graph.invoke({"messages": [message], "mode": "interleaved", "seed": 0}, config)
    (pixels,) = _seen(agent)[:1]
    assert pixels[0, 0].tolist() == [250, 250, 0]
    block = out["blocks"][-1]
    assert block["kind"] == "edit" and len(block["references"]) == 1
    stored = agent.graph.get_state(config).values["messages"][0].content[0]
    assert stored.get("file_id") == block["references"][0] and "base64" not in stored  # pixels out of state


def test_documents_hand_standard_blocks_to_other_models(home) -> None:
    from langchain_core.messages import convert_to_openai_messages

    agent = scripted_agent(home, [TEXT, image("a pot"), OK, DONE])
    doc = agent.run("draw a pot")
    blocks = doc.content_blocks(agent.store)
    assert [b["type"] for b in blocks] == ["text", "image"]
    assert base64.b64decode(blocks[1]["base64"]) == agent.store.read_bytes(doc.images[0].image)
    openai = convert_to_openai_messages(HumanMessage(content=blocks))
    urls = [p["image_url"]["url"] for p in openai["content"] if p["type"] == "image_url"]
    assert urls == [doc.images[0].image.data_url(agent.store)]


def test_async_twins(home, tmp_path) -> None:
    from duogen_agents.storage.database import Database

    agent = scripted_agent(home, [TEXT, image("a pot"), OK, DONE, TEXT, DONE])
    doc = asyncio.run(agent.arun("draw a pot"))
    assert [b.type for b in doc.blocks] == ["text", "image"]

    async def session_turn():
        with Database.open(f"sqlite:///{tmp_path / 'd.db'}", home=home) as db:
            events = [e async for e in agent.session("s", database=db).astream("and now?")]
            return events

    events = asyncio.run(session_turn())
    assert events[-1]["event"] == "document" and events[-1]["session_id"] == "s"


def test_the_agent_as_one_tool(home) -> None:
    agent = scripted_agent(home, [TEXT, image("a pot"), OK, DONE, TEXT, image("a pot"), OK, DONE])
    tool = agent.as_tool(mode="interleaved")
    msg = tool.invoke({"type": "tool_call", "name": tool.name, "args": {"request": "draw a pot"}, "id": "c1"})
    assert [b["type"] for b in msg.content] == ["text", "image"]
    assert msg.artifact["blocks"][1]["type"] == "image" and msg.artifact["mode"] == "interleaved"
    # Awaited (an async agent's ToolNode): the same answer, and a bad request is the same tool error.
    call = {"type": "tool_call", "name": tool.name, "args": {"request": "draw a pot"}, "id": "c2"}
    amsg = asyncio.run(tool.ainvoke(call))
    assert [b["type"] for b in amsg.content] == ["text", "image"] and amsg.content[0] == msg.content[0]
    assert amsg.status == "success" and amsg.artifact["blocks"][1]["prompt"] == "a pot"
    bad = asyncio.run(tool.ainvoke({**call, "args": {"request": "draw a pot", "mode": "comic"}}))
    assert bad.status == "error" and "unknown mode 'comic'" in bad.content


def _saved(agent) -> dict:
    """What the agent's in-memory checkpointer holds, by thread."""
    saver = agent.checkpointer
    threads = {*saver.storage, *(k[0] for k in saver.writes), *(k[0] for k in saver.blobs)}
    return {t: len(saver.storage.get(t, {}).get("", {})) for t in threads}


def test_one_shot_turns_keep_no_checkpoints(home) -> None:
    """A tool call, ``run``, ``arun``, a failed turn and a stream closed early each leave nothing in
    the agent's checkpointer (each kept its whole turn, about 50 KB, under a random thread id that
    was never returned or deleted); a turn given a ``thread_id`` keeps it, and the next turn with
    that id continues the conversation."""
    from duogen_agents.errors import GenerationError

    def fails(conversation, schema):
        raise GenerationError("the planner fell over (simulated)")

    agent = scripted_agent(home, [TEXT, image("a pot"), OK, DONE, TEXT, DONE, TEXT, DONE, TEXT, fails])
    tool = agent.as_tool(mode="interleaved")
    msg = tool.invoke({"type": "tool_call", "name": tool.name, "args": {"request": "draw a pot"}, "id": "c1"})
    assert msg.status == "success" and _saved(agent) == {}
    assert agent.run("and water it").text and _saved(agent) == {}
    assert asyncio.run(agent.arun("and again")).text and _saved(agent) == {}
    with pytest.raises(GenerationError, match="fell over"):
        agent.run("once more")
    assert _saved(agent) == {}

    agent.planner.script = [TEXT, image("a pot"), OK, DONE]
    events = agent.stream("draw a pot")
    assert next(e for e in events if e["event"] == "text")
    events.close()  # the caller stops reading halfway
    assert _saved(agent) == {}

    agent.planner.script = [TEXT, DONE, TEXT, DONE]
    first = list(agent.stream("draw a pot", thread_id="kept"))[-1]
    assert first["thread_id"] == "kept" and list(_saved(agent)) == ["kept"]
    list(agent.stream("and now?", thread_id="kept"))
    seen = [p["text"] for t in agent.planner.calls[-1][0] for p in t["content"] if p["type"] == "text"]
    assert "draw a pot" in seen and "and now?" in seen  # the second turn read the first
    assert list(_saved(agent)) == ["kept"]


def test_cancelling_an_async_tool_call_stops_its_turn(home) -> None:
    """An async agent's tool call (``ToolNode`` awaits ``ainvoke``) cancelled by its caller (a
    timeout, a client gone) stops the turn after the step in progress, as ``arun`` does, and keeps
    nothing (it ran in an executor: the turn went on to its end, asking the planner and drawing)."""
    entered, release = threading.Event(), threading.Event()
    agent = scripted_agent(home, [TEXT, image("a pot"), OK, image("a hat"), OK, DONE])
    real = agent.image_tool.draw

    def held_draw(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    agent.image_tool.draw = held_draw
    tool = agent.as_tool(mode="interleaved")
    call = {"type": "tool_call", "name": tool.name, "args": {"request": "draw a pot"}, "id": "c1"}

    async def main() -> None:
        threading.Timer(0.5, release.set).start()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(tool.ainvoke(call), 0.2)
        # The cancelled call returns once its turn has stopped (its step ended), not while it still runs.
        assert entered.is_set() and release.is_set() and _saved(agent) == {}
        await asyncio.sleep(1.0)  # time enough for a turn that went on to finish

    asyncio.run(main())
    assert len(agent.planner.calls) == 2  # the text and the image request: not the check nor what follows
    assert [r["prompt"] for r in agent.image_tool.requests] == ["a pot"]  # the draw in progress only
    assert _saved(agent) == {}


def test_a_parent_messages_state_graph_keeps_image_references_across_turns(home) -> None:
    """The subgraph contract: a parent ``MessagesState`` (no ``known_images``) still lets a follow-up
    reference the image of an earlier turn, and the planner's tokens are tagged in its stream."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, MessagesState, StateGraph

    from duogen_agents.graphs.turn import build_graph

    def edit_earlier(conversation, schema):
        labels = [
            p["text"]
            for t in conversation
            for p in t["content"]
            if p["type"] == "text" and p["text"].startswith("[image ")
        ]
        earlier = labels[0][len("[image ") : -1]
        assert earlier in json.dumps(schema)  # offered by the grammar
        return {"type": "image", "prompt": "the pot, blue", "references": [earlier], "kind": "edit"}

    agent = scripted_agent(home, [image("a pot"), OK, DONE, edit_earlier, OK, DONE])
    parent = StateGraph(MessagesState)
    parent.add_node("illustrate", build_graph(agent.deps))
    parent.add_edge(START, "illustrate")
    graph = parent.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "parent"}}
    graph.invoke({"messages": [HumanMessage("draw a pot")]}, config)
    tags = []
    for _namespace, (_chunk, meta) in graph.stream(
        {"messages": [HumanMessage("now make it blue")]}, config, stream_mode="messages", subgraphs=True
    ):
        tags.append(tuple(meta.get("tags") or []))
    messages = graph.get_state(config).values["messages"]
    files = [
        b["file_id"] for m in messages if not isinstance(m.content, str) for b in m.content if b.get("type") == "image"
    ]
    assert len(files) == 2 and files[0] != files[1]
    assert any("duogen:planner" in t for t in tags) and any("duogen:check" in t for t in tags)


def test_stream_parts_v2(home) -> None:
    from langchain_core.messages import AIMessageChunk

    agent = scripted_agent(home, [TEXT, image("a pot"), OK, DONE])
    v1 = list(agent.stream("draw a pot", seed=1))
    agent2 = scripted_agent(home, [TEXT, image("a pot"), OK, DONE])
    v2 = list(agent2.stream("draw a pot", seed=1, version="v2"))
    assert len(v2) == len(v1) and all(set(p) == {"type", "ns", "data"} for p in v2)
    messages = [p for p in v2 if p["type"] == "messages"]
    assert messages and all(isinstance(p["data"][0], AIMessageChunk) for p in messages)
    assert "duogen:planner" in messages[0]["data"][1]["tags"]
    last = v2[-1]
    assert last["type"] == "custom" and last["data"]["event"] == "document"
    assert [b.type for b in last["data"]["document"].blocks] == [b.type for b in v1[-1]["document"].blocks]
    with pytest.raises(Exception, match="unknown stream version"):
        list(agent.stream("x", version="v3"))


def test_a_documents_images_work_with_an_openai_compatible_model(home) -> None:
    """Handed to another model as standard blocks: the request an OpenAI-compatible stub receives
    carries the PNG itself (not an id only this store resolves)."""
    import json as _json
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import httpx
    from langchain_core.messages import convert_to_openai_messages

    received: list[dict] = []

    class Stub(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(_json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = _json.dumps({"choices": [{"message": {"role": "assistant", "content": "a pot"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        agent = scripted_agent(home, [TEXT, image("a pot"), OK, DONE])
        doc = agent.run("draw a pot")
        message = convert_to_openai_messages(
            HumanMessage(content=[{"type": "text", "text": "What is this?"}, *doc.content_blocks(agent.store)])
        )
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        reply = httpx.post(url, json={"model": "stub", "messages": [message]}).json()
        assert reply["choices"][0]["message"]["content"] == "a pot"
        (request,) = received
        parts = request["messages"][0]["content"]
        (image_part,) = [p for p in parts if p["type"] == "image_url"]
        data = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
        assert data == agent.store.read_bytes(doc.images[0].image)
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_whose_name_looks_like_a_url_is_the_file(home, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data:photo.png").write_bytes(_png((250, 0, 0)))
    agent = scripted_agent(home, [TEXT, DONE])
    doc = agent.run("x", images=["data:photo.png"])
    assert np.asarray(agent.store.open(doc.inputs[0]))[0, 0].tolist() == [250, 0, 0]


def test_a_data_url_as_a_plain_string(home) -> None:
    """Longer than a file name may be (``Path.is_file`` raised "File name too long" on it)."""
    from PIL import Image

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert len(url) > 8000
    agent = scripted_agent(home, [TEXT, DONE])
    doc = agent.run("x", images=[url])
    assert np.asarray(agent.store.open(doc.inputs[0])).tolist() == noise.tolist()
