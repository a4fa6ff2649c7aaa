"""Graph logic with a scripted planner; references reach the real conditioning pipeline."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from duogen_agents import Agent, GenerationError
from duogen_agents.presets import load_preset
from tests.fakes import ScriptedPlanner, SolidImageTool

DONE = {"type": "done"}


def _agent(home, script, tool=None, **limits):
    preset = load_preset("tiny")
    preset.limits = preset.limits.model_copy(update=limits)
    return Agent(preset, planner=ScriptedPlanner(script), image_tool=tool or SolidImageTool(), home=home)


def _upload(tmp_path, color=(250, 10, 10), size=(64, 64)):
    p = tmp_path / f"up-{color[0]}.png"
    Image.new("RGB", size, color).save(p)
    return p


def test_rejected_image_is_revised_by_the_planner_within_the_budget(tmp_path) -> None:
    tool = SolidImageTool()
    redraw = {"verdict": "redraw", "note": "the pot should be red"}
    revised = {"prompt": "a red terracotta pot", "references": [], "kind": "generate"}
    agent = _agent(
        tmp_path,
        [{"type": "image", "prompt": "a pot", "references": [], "kind": "generate"}, redraw, revised, redraw, DONE],
        tool=tool,
        redraw_budget=1,
    )
    doc = agent.run("draw a pot")
    # One draw, then the planner's revised request (not the same prompt with another seed); the second
    # rejection is over the budget, so that drawing is kept.
    assert [r["prompt"] for r in tool.requests] == ["a pot", "a red terracotta pot"]
    (block,) = doc.images
    assert block.attempts == 2 and block.prompt == "a red terracotta pot"
    assert [(r.prompt, r.note) for r in block.rejected] == [("a pot", "the pot should be red")]
    assert block.rejected[0].image.id != block.image.id
    # The revision call saw the rejected image and the check's note.
    conversation, schema = agent.planner.calls[2]
    last = conversation[-1]["content"]
    assert any(p["type"] == "image" for p in last)
    assert any("the pot should be red" in p.get("text", "") for p in last)
    assert '"prompt"' in json.dumps(schema) and '"done"' not in json.dumps(schema)


def test_limits_end_the_turn(tmp_path) -> None:
    agent = _agent(tmp_path, [{"type": "text", "text": f"chunk {i}"} for i in range(3)], max_actions=3)
    doc = agent.run("talk")
    assert [b.text for b in doc.blocks] == ["chunk 0", "chunk 1", "chunk 2"]


def test_image_limit_removes_images_from_the_grammar(tmp_path) -> None:
    agent = _agent(
        tmp_path,
        [{"type": "image", "prompt": "p", "references": [], "kind": "generate"}, {"type": "done"}],
        max_images=1,
        check=False,
    )
    agent.run("x")
    schemas = [json.dumps(s) for _, s in agent.planner.calls]
    assert '"image"' in schemas[0] and '"const": "image"' not in schemas[1]


def test_unknown_reference_is_a_generation_error(tmp_path) -> None:
    agent = _agent(tmp_path, [{"type": "image", "prompt": "p", "references": ["ffffffffffff"], "kind": "edit"}])
    with pytest.raises(GenerationError, match="names no earlier image"):
        agent.run("x")


def test_state_and_checkpoints_hold_no_pixels(tiny_agent) -> None:
    """Every checkpoint of a real tiny run is small and holds ids, never image bytes."""
    from duogen_agents.agent import last_document

    # A named thread keeps its checkpoints (a one-shot ``run`` deletes them when it ends).
    last_document(tiny_agent.stream("Plan a picnic", mode="visual-plan", seed=4, thread_id="no-pixels"))
    saver = tiny_agent.checkpointer
    checked = 0
    for tup in saver.list({"configurable": {"thread_id": "no-pixels"}}):
        type_, blob = saver.serde.dumps_typed(tup.checkpoint)
        assert b"\x89PNG" not in blob and b"iVBORw0KGgo" not in blob  # PNG bytes, raw or base64
        assert len(blob) < 64 * 1024

        def walk(v):
            assert not isinstance(v, (bytes, bytearray, Image.Image)), type(v)
            if isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)

        walk(tup.checkpoint["channel_values"])
        checked += 1
    assert checked > 5


def test_renderer_as_langchain_tool_shows_the_picture_and_returns_its_id(tmp_path) -> None:
    import base64

    from duogen_agents.storage.images import ImageStore
    from duogen_agents.tools.render import Renderer

    def call(args, n):
        return lc_tool.invoke({"type": "tool_call", "name": "draw_image", "args": args, "id": f"call-{n}"})

    tool = SolidImageTool()
    store = ImageStore(tmp_path)
    lc_tool = Renderer(tool, store).as_langchain_tool()
    first = call({"prompt": "a pot"}, 1)
    ref = first.artifact
    text, image = first.content
    assert ref["short_id"] in text["text"] and image["type"] == "image" and image["mime_type"] == "image/png"
    assert base64.b64decode(image["base64"]) == store.read_bytes(ref["id"])  # the picture itself, inline
    second = call({"prompt": "the pot, blue", "references": [ref["short_id"]], "kind": "edit"}, 2)
    assert second.artifact["kind"] == "edit" and tool.requests[1]["kind"] == "edit"
    assert len(tool.requests[1]["references"]) == 1  # the first image reached the draw as a reference
    assert store.exists(second.artifact["id"])
    bad = call({"prompt": "x", "references": ["ffffffffffff"]}, 3)
    assert bad.status == "error" and "names no earlier image" in bad.content  # a tool error, not a raise


def test_the_check_runs_on_the_critic_when_the_preset_names_one(tmp_path) -> None:
    preset = load_preset("tiny")
    planner = ScriptedPlanner([{"type": "image", "prompt": "a pot", "references": [], "kind": "generate"}, DONE])
    critic = ScriptedPlanner([{"verdict": "ok", "note": ""}])
    agent = Agent(preset, planner=planner, image_tool=SolidImageTool(), home=tmp_path, critic=critic)
    doc = agent.run("draw a pot")
    assert len(doc.images) == 1
    (call,) = critic.calls  # the critic looked at the image; the planner only planned
    assert any(p["type"] == "image" for p in call[0][-1]["content"])
    assert len(planner.calls) == 2 and "verdict" not in json.dumps(planner.calls[1][1])


@pytest.mark.slow
def test_a_critic_model_loads_from_the_preset(tmp_path, home) -> None:
    f = tmp_path / "critic.toml"
    f.write_text(
        'base = "tiny"\n[critic]\nmodel = "tiny:qwen3_vl"\ndevice = "cpu"\ndtype = "float32"\n'
        "max_new_tokens = 512\nmax_text_chars = 48\nmax_prompt_chars = 32\n"
    )
    agent = Agent.from_preset(f, home=home)
    assert agent.deps.critic is not None and agent.deps.critic.planner is not agent.planner
    doc = agent.run("Plan a picnic", mode="visual-plan", seed=2)
    assert doc.images


def test_default_preset_comes_from_the_environment(monkeypatch, capsys) -> None:
    from duogen_agents.cli import main

    monkeypatch.setenv("DUOGEN_PRESET", "no-such-preset")
    assert main(["run", "hello"]) == 1
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def test_a_steps_text_does_not_repeat_its_headings_number(tmp_path) -> None:
    """A step's text that starts with its own "Step N:" (the shapes planner writes "Step 1: red circle
    top-left" under "### Step 1: ..."; real models often do too) reads without it; another number,
    or "Step" as a word, stays. The planner still reads back what it wrote."""
    image = {"prompt": "a pot", "references": [], "kind": "generate"}
    texts = ["Step 1: Water the plant.", "step 2) Drain it.", "Step 2: then the third.", "Step 4:"]
    plan = {"title": "Repot", "steps": [{"title": t} for t in ["Water", "Drain", "Dry", "Walk"]]}
    script = [plan] + [{"text": t, "image": image} for t in texts]
    agent = _agent(tmp_path, script, check=False, max_images=4)
    doc = agent.run("Repot a plant", mode="visual-plan")
    bodies = [b.text.split("\n\n", 1)[1] for b in doc.blocks if b.type == "text"]
    assert bodies == ["Water the plant.", "Drain it.", "Step 2: then the third.", "Step 4:"]  # nothing else: kept
    conversation, _schema = agent.planner.calls[-1]
    assert "Step 1: Water the plant." in json.dumps(conversation, default=str)


def test_a_plan_steps_own_numbering_is_not_repeated_in_its_heading(tmp_path) -> None:
    """Models often number their step titles; the heading numbers them already ("### Step 1: Step 1:")."""
    image = {"prompt": "a pot", "references": [], "kind": "generate"}
    titles = ["Step 1: Water the plant", "Stepping stones", "Step 3", "Step 1.5 cups of soil"]
    plan = {"title": "Repot", "steps": [{"title": t} for t in titles]}
    script = [plan] + [{"text": "Do it.", "image": image}] * 4
    agent = _agent(tmp_path, script, check=False, max_images=4)
    doc = agent.run("Repot a plant", mode="visual-plan")
    headings = [b.text.split("\n")[0] for b in doc.blocks if b.type == "text"]
    # The planner reads back its step as it wrote the title: trained planners learned from that text.
    conversation, _schema = agent.planner.calls[-1]
    said = json.dumps(conversation, default=str)  # pictures as their repr
    assert "### Step 1: Step 1: Water the plant" in said and "### Step 3: Step 3" in said
    assert headings == [
        "### Step 1: Water the plant",
        "### Step 2: Stepping stones",
        "### Step 3",
        "### Step 4: Step 1.5 cups of soil",
    ]


def test_a_session_longer_than_the_planner_context_leaves_out_its_oldest_turns(home) -> None:
    """The real planner, its context made small: the third turn does not fit with the first two, so
    its calls leave out the oldest whole turns (as few as fit) and the turn answers; a turn that does
    not fit alone is one clear error, and the session goes on."""
    from duogen_agents import PromptTooLongError

    agent = Agent.from_preset("tiny", home=home)
    session = agent.session("long")
    for turn in (1, 2):
        session.send(f"Turn {turn}: say something short.", mode="interleaved", seed=turn)
    planner = agent.planner
    conversation, _ = planner.last_calls["long"]
    whole = planner.encode(conversation)["input_ids"].shape[1]  # turns 1 and 2
    planner.context_tokens = whole + 400  # turn 3 cannot keep them all
    doc = session.send("Turn 3: say something short.", mode="interleaved", seed=3)
    assert doc.blocks
    conversation, _ = planner.last_calls["long"]
    text = json.dumps([part.get("text", "") for t in conversation for part in t["content"]])
    assert "Turn 1:" not in text and "Turn 3:" in text
    dropped, _length = agent.deps.dropped_turns[("long", "duogen:planner")]
    assert dropped >= 1
    assert planner.encode(conversation)["input_ids"].shape[1] < planner.context_tokens
    planner.context_tokens = 40  # not even the system prompt and this turn
    with pytest.raises(PromptTooLongError, match="planner reads at most 39"):
        session.send("Turn 4: say something short.", mode="interleaved", seed=4)
    planner.context_tokens = 2**31
    assert session.cancel()  # the failed turn, as `duogen run --discard` does
    assert session.send("Turn 4: say something short.", mode="interleaved", seed=4).blocks
    turns = session.history()  # the refused turn stays on record, cancelled
    assert [t.status for t in turns] == ["complete", "complete", "complete", "cancelled", "complete"]


def test_the_graph_checks_what_its_own_callers_send(tmp_path) -> None:
    """A parent graph or a LangGraph server's client calls the graph without ``Agent``'s checks: a
    wrong mode or seed is a one-line ConfigError (it was a KeyError, a TypeError or an overflow deep
    in a node), and ``seed: None`` means the default."""
    from langgraph.checkpoint.memory import InMemorySaver

    from duogen_agents import ConfigError, build_graph

    agent = _agent(tmp_path, [{"type": "text", "text": "A pot."}, DONE])
    graph = build_graph(agent.deps, checkpointer=InMemorySaver())
    message = {"messages": [{"role": "user", "content": "Draw a pot"}]}
    for bad, match in (
        ({"mode": "Visual-Plan"}, "unknown mode 'Visual-Plan'; choose one of: interleaved, visual-plan, draft"),
        ({"seed": "7"}, "seed '7' is out of range"),
        ({"seed": -5}, "seed -5 is out of range"),
        ({"seed": 2**64}, "out of range"),
        ({"seed": True}, "seed True is out of range"),
    ):
        with pytest.raises(ConfigError, match=match):
            graph.invoke({**message, **bad}, {"configurable": {"thread_id": f"bad-{len(str(bad))}"}})
    out = graph.invoke({**message, "seed": None}, {"configurable": {"thread_id": "none"}})
    assert out["seed"] == 0 and out["blocks"][0]["text"] == "A pot."


def test_a_picture_in_a_tool_result_is_stored_and_may_be_referenced(tmp_path) -> None:
    """Images were taken in from user messages only: a picture in a tool's result (``draw_image``'s
    own ToolMessage carries a base64 block, as LangChain tools return images) never became a known
    image, so the planner could not reference it, and its pixels stayed in the graph state (and so in
    every checkpoint)."""
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.checkpoint.memory import InMemorySaver

    from duogen_agents import build_graph

    maker = _agent(tmp_path, [])
    result = maker.renderer.as_langchain_tool().invoke(
        {"type": "tool_call", "name": "draw_image", "args": {"prompt": "a terracotta pot"}, "id": "c1"}
    )
    assert any("base64" in b for b in result.content if isinstance(b, dict))
    pot = result.artifact["short_id"]
    edit = {"type": "image", "prompt": "repotting, the same pot", "references": [pot], "kind": "edit"}
    agent = _agent(tmp_path, [edit, {"verdict": "ok"}, DONE])
    history = [
        HumanMessage("Draw a terracotta pot"),
        AIMessage("", tool_calls=[{"name": "draw_image", "args": {"prompt": "a terracotta pot"}, "id": "c1"}]),
        result,
        HumanMessage("Now illustrate repotting, keeping that same pot"),
    ]
    graph = build_graph(agent.deps, checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    graph.invoke({"messages": history}, config)
    state = graph.get_state(config).values
    assert pot in state["known_images"]
    (drawn,) = [b for b in state["blocks"] if b["type"] == "image"]
    assert drawn["references"] == [result.artifact["id"]]  # the tool's picture was the edit's reference
    tool_message = next(m for m in state["messages"] if m.type == "tool")
    assert not any("base64" in b for b in tool_message.content if isinstance(b, dict))  # no pixels in state


def test_the_graph_checks_a_direct_request_and_fills_in_the_rest(tmp_path) -> None:
    """A caller of the graph's own ``request`` key (a redraw without the planner) may give only the
    prompt: the rest takes its defaults (it was a KeyError 'attempt' deep in ``render``), and a
    malformed request is a one-line ConfigError naming the field, before anything is drawn."""
    from langgraph.checkpoint.memory import InMemorySaver

    from duogen_agents import ConfigError, build_graph

    tool = SolidImageTool()
    agent = _agent(tmp_path, [{"verdict": "ok"}] * 2, tool=tool)
    graph = build_graph(agent.deps, checkpointer=InMemorySaver())
    message = {"messages": [{"role": "user", "content": "redraw it"}]}
    for bad, match in (
        ({"prompt": "a blue pot", "attempt": 0}, r"^request\.attempt: Input should be greater than or equal to 1;"),
        ({"prompt": "a blue pot", "colour": "blue"}, r"^request\.colour: Extra inputs are not permitted;"),
        ({"references": []}, r"^request\.prompt: Field required;"),
        ({"prompt": "a pot", "kind": "paint"}, r"^request\.kind: Input should be 'generate', 'edit' or 'continue';"),
        ({"prompt": ""}, r"^request\.prompt: String should have at least 1 character;"),
        ("a blue pot", r"^request must be an image request: \{'prompt': str\}.*; got str"),
    ):
        with pytest.raises(ConfigError, match=match) as e:
            graph.invoke({**message, "request": bad}, {"configurable": {"thread_id": f"bad-{bad!s:.20}"}})
        assert "\n" not in str(e.value)
    assert tool.requests == []
    out = graph.invoke({**message, "request": {"prompt": "a blue pot"}}, {"configurable": {"thread_id": "ok"}})
    assert [r["prompt"] for r in tool.requests] == ["a blue pot"]
    (block,) = out["blocks"]
    assert block["type"] == "image" and block["prompt"] == "a blue pot" and block["attempts"] == 1
    assert block["kind"] == "generate" and block["origin"] == "generated" and block["references"] == []
    assert out["pending"] is None and out["direct"] is True
    # What the planner's grammar lets through is what a redraw sends back: a prompt of spaces is drawn.
    graph.invoke({**message, "request": {"prompt": "  "}}, {"configurable": {"thread_id": "spaces"}})
    assert [r["prompt"] for r in tool.requests] == ["a blue pot", "  "]
