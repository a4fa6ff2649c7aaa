"""The tiny preset end to end: real from_pretrained, real generate under a grammar, real diffusers."""

from __future__ import annotations

import pytest

from duogen_agents import ImageBlock, InterleavedDocument, TextBlock


def test_visual_plan_every_step_has_an_image(tiny_agent) -> None:
    doc = tiny_agent.run("How do I repot a plant?", mode="visual-plan", seed=0)
    lim = tiny_agent.preset.limits
    steps = sorted({b.step for b in doc.blocks if b.step is not None})
    assert lim.plan_min_steps <= len(steps) <= lim.plan_max_steps
    assert doc.title
    for step in steps:
        kinds = [type(b) for b in doc.blocks if b.step == step]
        assert kinds == [TextBlock, ImageBlock], f"step {step} should be its text, then its image"
    for img in doc.images:
        assert tiny_agent.store.exists(img.image.id)
        assert tiny_agent.store.open(img.image).size == (64, 64)


def test_draft_mode_keeps_marked_drafts_then_answers(tiny_agent) -> None:
    doc = tiny_agent.run("Sketch a kitchen layout, then describe it.", mode="draft", seed=2)
    assert doc.images and all(b.draft for b in doc.images)
    assert len(doc.images) <= tiny_agent.preset.limits.max_drafts
    assert isinstance(doc.blocks[-1], TextBlock), "the answer comes after the drafts"


def test_interleaved_mode_produces_a_document(tiny_agent) -> None:
    doc = tiny_agent.run("Tell a short illustrated story.", mode="interleaved", seed=5)
    assert isinstance(doc, InterleavedDocument)
    assert doc.blocks, "the first action may not be 'done', so there is always content"
    assert len(doc.images) <= tiny_agent.preset.limits.max_images


def test_same_seed_same_document(tiny_agent) -> None:
    a = tiny_agent.run("Plan a picnic", mode="visual-plan", seed=11)
    b = tiny_agent.run("Plan a picnic", mode="visual-plan", seed=11)
    assert a.model_dump() == b.model_dump()


def test_stream_yields_tokens_progress_and_document(tiny_agent) -> None:
    events = list(tiny_agent.stream("Plan a picnic", mode="visual-plan", seed=1))
    kinds = [e["event"] for e in events]
    assert "token" in kinds, "planner tokens arrive through LangGraph's messages stream mode"
    assert "image_progress" in kinds and "image_ready" in kinds and kinds[-1] == "document"
    steps = [e["step"] for e in events if e["event"] == "image_progress"]
    assert max(steps) == tiny_agent.preset.image.steps
    tokens = "".join(e["text"] for e in events if e["event"] == "token" and e["node"] == "outline")
    assert tokens.startswith("{") and tokens.endswith("}")


def test_user_images_are_stored_and_seen(tiny_agent, tmp_path) -> None:
    from PIL import Image

    p = tmp_path / "in.png"
    Image.new("RGB", (80, 50), (10, 200, 30)).save(p)
    doc = tiny_agent.run("Redraw this in another style", mode="draft", images=[p], seed=3)
    assert len(doc.inputs) == 1 and tiny_agent.store.exists(doc.inputs[0].id)


@pytest.mark.parametrize("preset", ["tiny-qwen3"])
def test_qwen3_vl_planner_end_to_end(preset, tmp_path, models_dir) -> None:
    from duogen_agents import Agent

    home = tmp_path / "h"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    agent = Agent.from_preset(preset, home=home)
    assert type(agent.planner.model).__name__ == "Qwen3VLForConditionalGeneration"
    doc = agent.run("How do I repot a plant?", mode="visual-plan", seed=0)
    assert len(doc.images) >= 2
