"""Limits end turns, never crash them: sweeps over each limit with the real tiny models, several seeds.

Each run must end with a valid document and a ``finish`` event naming why it stopped; no planner call
may be cut mid-action (every call gets at least the tokens its action can take), and visual plans never
draw more images than allowed.
"""

from __future__ import annotations

import pytest

from duogen_agents import Agent
from duogen_agents.errors import ConfigError
from duogen_agents.graphs import actions as A
from duogen_agents.presets import Preset, load_preset

SEEDS = (0, 1, 2)


def _agent(tiny_agent, tmp_path, **limits) -> Agent:
    base = load_preset("tiny").model_dump()
    preset = Preset.model_validate({**base, "limits": {**base["limits"], **limits}})
    return Agent(preset, planner=tiny_agent.planner, image_tool=tiny_agent.image_tool, home=tmp_path)


def _run(agent: Agent, mode: str, seed: int):
    calls: list[tuple[int, int]] = []
    real = agent.planner.generate

    def spy(conversation, schema, *, max_new_tokens=None, **kw):
        out = real(conversation, schema, max_new_tokens=max_new_tokens, **kw)
        calls.append((max_new_tokens, A.max_action_tokens(schema), out.num_tokens))
        return out

    agent.planner.generate = spy
    try:
        events = list(agent.stream("Plan a picnic in the park", mode=mode, seed=seed))
    finally:
        del agent.planner.generate
    finish = [e for e in events if e["event"] == "finish"]
    assert len(finish) == 1 and finish[0]["stop_reason"], events[-3:]
    for max_new, need, _ in calls:
        assert max_new >= need, "a planner call was given fewer tokens than its action can take"
    return events[-1]["document"], finish[0]["stop_reason"], calls


@pytest.mark.slow
@pytest.mark.parametrize("max_turn_tokens", [260, 410, 800, 1200])
@pytest.mark.parametrize("mode", ["interleaved", "draft", "visual-plan"])
def test_turn_token_budget_ends_the_turn(tiny_agent, tmp_path, mode, max_turn_tokens) -> None:
    agent = _agent(tiny_agent, tmp_path, max_turn_tokens=max_turn_tokens)
    if problem := agent.preset.mode_problem(mode):
        with pytest.raises(ConfigError, match="max_turn_tokens"):
            agent.run("Plan a picnic", mode=mode)
        assert mode != "interleaved" and "max_turn_tokens" in problem
        return
    for seed in SEEDS:
        doc, reason, calls = _run(agent, mode, seed)
        assert sum(n for _, _, n in calls) <= max_turn_tokens
        assert reason in ("max_turn_tokens", "done", "answered", "plan_complete", "max_actions", "max_images")
        assert doc.mode == mode


@pytest.mark.slow
@pytest.mark.parametrize("max_images", [1, 2])
def test_visual_plans_never_draw_more_than_max_images(tiny_agent, tmp_path, max_images) -> None:
    agent = _agent(tiny_agent, tmp_path, max_images=max_images, plan_min_steps=2, plan_max_steps=4)
    for seed in SEEDS:
        doc, reason, _ = _run(agent, "visual-plan", seed)
        assert 1 <= len(doc.images) <= max_images
        assert reason in ("plan_complete", "max_images", "max_turn_tokens", "max_actions")


@pytest.mark.slow
def test_draft_mode_respects_max_images(tiny_agent, tmp_path) -> None:
    agent = _agent(tiny_agent, tmp_path, max_images=1, max_drafts=3)
    for seed in SEEDS:
        doc, _, _ = _run(agent, "draft", seed)
        assert len(doc.images) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("max_actions", [1, 2, 3])
def test_action_limit_ends_the_turn(tiny_agent, tmp_path, max_actions) -> None:
    agent = _agent(tiny_agent, tmp_path, max_actions=max_actions)
    for seed in SEEDS:
        doc, reason, calls = _run(agent, "interleaved", seed)
        # Actions are the planner's answer-writing calls; checks and revisions come on top.
        assert reason in ("max_actions", "done", "max_turn_tokens")
        assert len([b for b in doc.blocks]) <= max_actions


@pytest.mark.slow
@pytest.mark.parametrize("redraw_budget", [0, 1, 2])
def test_redraw_budget_bounds_attempts(tiny_agent, tmp_path, redraw_budget) -> None:
    agent = _agent(tiny_agent, tmp_path, redraw_budget=redraw_budget)
    for seed in SEEDS:
        doc, _, _ = _run(agent, "visual-plan", seed)
        for block in doc.images:
            assert block.attempts <= redraw_budget + 1 and len(block.rejected) == block.attempts - 1


def test_presets_that_cannot_hold_an_action_are_refused(tmp_path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('base = "tiny"\n[planner]\nmax_new_tokens = 100\n')
    with pytest.raises(ConfigError, match=r"planner.max_new_tokens = 100 cannot hold the largest action"):
        load_preset(path)
    path.write_text('base = "tiny"\n[limits]\nmax_turn_tokens = 100\n')
    with pytest.raises(ConfigError, match=r"limits.max_turn_tokens = 100 cannot hold one whole action"):
        load_preset(path)
    path.write_text('base = "tiny"\n[limits]\nmax_images = 0\n')
    preset = load_preset(path)
    assert preset.mode_problem("interleaved") is None
    assert "max_images = 0" in (preset.mode_problem("visual-plan") or "")
    assert "max_images = 0" in (preset.mode_problem("draft") or "")


def test_max_json_chars_bounds_the_longest_output() -> None:
    import json

    schema = A.step_schema(["a" * 12, "b" * 12], max_text=5, max_prompt=4, max_refs=2)
    # Every character an escape, every reference used, the longest kind.
    worst = (
        '{"text": "' + '\\"' * 5 + '", "image": {"prompt": "' + '\\"' * 4
        + '", "references": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "kind": "continue"}}'
    )  # fmt: skip
    assert json.loads(worst)["text"] == '"' * 5
    # Each of the 9 string characters is bounded by TOKENS_PER_CHAR (the escapes here take 2).
    assert len(worst) <= A.max_json_chars(schema) < len(worst) + (A.TOKENS_PER_CHAR - 2) * 9 + 16


def test_the_bound_holds_for_text_that_costs_several_tokens_per_character(models_dir) -> None:
    """Byte-level BPE spends up to one token per UTF-8 byte: emoji and rare CJK are the worst case."""
    import json

    from transformers import AutoTokenizer

    from duogen_agents.models.tiny import ensure_tiny_planner

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_planner(models_dir))
    spec = load_preset("tiny").planner
    schema = A.next_action_schema(
        [], max_text=spec.max_text_chars, max_prompt=spec.max_prompt_chars, max_refs=4, allow_image=False,
        allow_done=True,
    )  # fmt: skip
    for char in ("\U0001f600", "\u9f98", "\u00e9", '"'):
        text = json.dumps({"type": "text", "text": char * spec.max_text_chars}, ensure_ascii=False)
        assert len(tokenizer(text)["input_ids"]) <= A.max_action_tokens(schema), char
