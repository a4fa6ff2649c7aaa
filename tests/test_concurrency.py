"""Safe concurrency: threads and asyncio tasks share one loaded preset; the library takes turns per
device, first come first served, with a bounded queue, and every pipeline call has its own scheduler."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from PIL import Image

from duogen_agents.errors import GenerationError
from duogen_agents.models.serial import DeviceQueue, device_key
from duogen_agents.tools.render import Renderer


def _start(target, *args) -> threading.Thread:
    t = threading.Thread(target=target, args=args)
    t.start()
    return t


def _until(predicate, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_turns_are_served_in_arrival_order() -> None:
    q = DeviceQueue("test", max_waiting=16)
    order: list[int] = []

    def worker(i: int) -> None:
        with q.turn():
            order.append(i)

    with q.turn():
        threads = []
        for i in range(6):
            threads.append(_start(worker, i))
            _until(lambda i=i: q.waiting == i + 1)  # each has taken its ticket before the next starts
    for t in threads:
        t.join()
    assert order == list(range(6))


def test_the_queue_is_bounded_and_a_timeout_gives_up_its_place() -> None:
    q = DeviceQueue("the test device", max_waiting=1)
    results: list[str] = []

    def worker(timeout=None) -> None:
        try:
            with q.turn(timeout):
                results.append("served")
        except GenerationError as e:
            results.append(str(e))

    with q.turn():
        t1 = _start(worker)
        _until(lambda: q.waiting == 1)
        t_over = _start(worker)  # a second waiter is one too many: refused at once
        t_over.join()
        assert "already waiting for the test device" in results[-1]
    t1.join()
    assert results[-1] == "served"
    with q.turn():
        t2 = _start(worker, 0.05)
        t2.join()
        assert "waited more than" in results[-1]
        t3 = _start(worker)  # the abandoned ticket is skipped: this one is served after release
        _until(lambda: q.waiting == 1)
    t3.join()
    assert results[-1] == "served"


def test_the_holder_may_call_again() -> None:
    q = DeviceQueue("test")
    with q.turn(), q.turn():
        pass
    assert q.waiting == 0


def test_device_keys() -> None:
    assert device_key("cuda") == device_key("cuda:0") == "cuda:0"
    assert device_key("cpu") == device_key("cpu:0") == "cpu"
    assert device_key("cuda:1") == "cuda:1"


def _images(doc) -> list[str]:
    return [b.image.id for b in doc.images]


@pytest.mark.slow
def test_threads_and_asyncio_tasks_share_one_preset(tiny_agent) -> None:
    """Concurrent turns on one loaded tiny preset give exactly what the same turns give one by one."""
    prompts = [("Plan a picnic", "visual-plan", 11), ("Draw a cat", "interleaved", 12), ("A garden", "draft", 13)]
    alone = [tiny_agent.run(p, mode=m, seed=s) for p, m, s in prompts]

    together: list = [None] * len(prompts)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            p, m, s = prompts[i]
            together[i] = tiny_agent.run(p, mode=m, seed=s)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [_start(run, i) for i in range(len(prompts))]
    for t in threads:
        t.join()
    assert not errors, errors
    assert [_images(d) for d in together] == [_images(d) for d in alone]
    assert [d.text for d in together] == [d.text for d in alone]

    async def gather() -> list:
        return await asyncio.gather(*(asyncio.to_thread(tiny_agent.run, p, mode=m, seed=s) for p, m, s in prompts))

    assert [_images(d) for d in asyncio.run(gather())] == [_images(d) for d in alone]


@pytest.mark.slow
def test_parallel_draws_on_one_image_tool(tiny_agent) -> None:
    """Three tool calls at once (as an agent's parallel draw_image calls): no shared scheduler state."""
    renderer = Renderer(tiny_agent.image_tool, tiny_agent.store)
    ref = tiny_agent.store.put(Image.new("RGB", (64, 64), (200, 40, 40)))
    requests = [("a pot", [], "generate"), ("the pot, later", [ref], "continue"), ("the pot, blue", [ref], "edit")]
    alone = [renderer.render(p, r, kind=k, seed=3).ref for p, r, k in requests]
    got: list = [None] * 3
    errors: list[BaseException] = []

    def draw(i: int) -> None:
        try:
            p, r, k = requests[i]
            got[i] = renderer.render(p, r, kind=k, seed=3).ref
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [_start(draw, i) for i in range(3)]
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == alone


@pytest.mark.slow
def test_create_agent_with_three_parallel_draw_image_calls(tiny_agent) -> None:
    """A LangChain agent whose model asks for three pictures at once gets three images (the tool
    calls run in parallel on one loaded image model)."""
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, ToolMessage

    class ToolCallingFake(GenericFakeChatModel):
        def bind_tools(self, tools, **kwargs):
            return self

    calls = [{"name": "draw_image", "args": {"prompt": f"picture {i}", "seed": i}, "id": f"c{i}"} for i in range(3)]
    model = ToolCallingFake(messages=iter([AIMessage(content="", tool_calls=calls), AIMessage(content="done")]))
    tool = Renderer(tiny_agent.image_tool, tiny_agent.store).as_langchain_tool()
    agent = create_agent(model, tools=[tool])
    result = agent.invoke({"messages": [{"role": "user", "content": "draw three pictures"}]})
    tool_messages = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert len(tool_messages) == 3 and all(m.status == "success" for m in tool_messages)
    ids = {m.artifact["id"] for m in tool_messages}
    assert len(ids) == 3 and all(tiny_agent.store.exists(i) for i in ids)
    assert all(any(b.get("type") == "image" for b in m.content) for m in tool_messages)


def test_cancelling_an_async_turn_marks_it_interrupted_and_frees_the_session(tiny_agent, monkeypatch) -> None:
    """``asyncio.wait_for`` (or a client gone) cancels ``asend`` while a step runs in the worker: the
    cancellation reaches the caller, the turn is marked interrupted and the session can be resumed at
    once (before, the stream was closed inside its running step: 'generator already executing', the
    turn left running and the session locked until garbage collection)."""
    from duogen_agents.errors import SessionStateError

    tool = tiny_agent.image_tool
    entered, release = threading.Event(), threading.Event()
    real = tool.draw

    def held_draw(*args, **kwargs):
        entered.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(tool, "draw", held_draw)
    session = tiny_agent.session("cancelled-async")

    async def main() -> None:
        task = asyncio.create_task(session.asend("Plan a picnic", mode="visual-plan", seed=3))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # while the worker is inside the draw
        threading.Timer(0.2, release.set).start()
        with pytest.raises(asyncio.CancelledError):
            await task
        # By the time the cancellation arrives the turn is closed: no gc, no waiting.
        assert [t.status for t in session.history()] == ["interrupted"]
        with pytest.raises(SessionStateError, match="unfinished turn"):
            await session.asend("and now?")

        async def timed_out() -> None:  # the same through wait_for, on a new session
            entered.clear()
            release.clear()
            threading.Timer(0.5, release.set).start()
            await asyncio.wait_for(tiny_agent.session("timed-out").asend("A garden", mode="visual-plan"), 0.2)

        with pytest.raises(TimeoutError):
            await timed_out()
        assert [t.status for t in tiny_agent.session("timed-out").history()] == ["interrupted"]

    asyncio.run(main())
    monkeypatch.undo()
    doc = list(session.resume())[-1]["document"]  # the lock is free: the turn resumes and finishes
    assert [t.status for t in session.history()] == ["complete"]
    # The draw that was running when the task was cancelled finished in the worker and was saved
    # without its step being committed; resuming goes on from it (it used to end the turn there,
    # without the picture and the steps after it).
    whole = tiny_agent.session("not-cancelled").send("Plan a picnic", mode="visual-plan", seed=3)
    assert doc.images and _images(doc) == _images(whole) and doc.text == whole.text


def test_an_async_turn_runs_in_its_callers_context(tiny_agent) -> None:
    """A parent runnable's callbacks (and tracing) see the graph runs of an ``astream`` turn, as they
    do a ``stream`` turn's: the steps run in the caller's context (they ran in an empty one, so the
    parent's handler saw only its own run)."""
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.runnables import RunnableLambda

    class Starts(BaseCallbackHandler):
        def __init__(self) -> None:
            self.names: list[str] = []

        def on_chain_start(self, serialized, inputs, **kwargs) -> None:
            self.names.append(kwargs.get("name") or "")

    def seen(run_async: bool) -> list[str]:
        handler = Starts()

        async def body_async(_: str) -> int:
            return len([e async for e in tiny_agent.astream("Draw a pot", seed=1)])

        def body_sync(_: str) -> int:
            return len(list(tiny_agent.stream("Draw a pot", seed=1)))

        if run_async:
            asyncio.run(RunnableLambda(body_async).ainvoke("x", config={"callbacks": [handler]}))
        else:
            RunnableLambda(body_sync).invoke("x", config={"callbacks": [handler]})
        return handler.names

    sync, in_async = seen(False), seen(True)
    assert "LangGraph" in sync and "plan" in sync  # the turn's graph and its nodes, under the parent's run
    assert sorted(in_async) == sorted(n.replace("body_sync", "body_async") for n in sync)
