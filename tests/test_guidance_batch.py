"""Guidance in one batch (``image.cfg_batch``) on the real tiny Cosmos pipelines: every step paired,
the picture the unbatched pipeline's, the pipeline left as it was, and anything it does not recognise
run as the pipeline asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duogen_agents.models.images import build_image_tool
from duogen_agents.models.images.guidance_batch import _PairedDiT, one_batch
from duogen_agents.presets import ImageSpec, load_preset


def _tool(models_dir, **update):
    spec = load_preset("tiny").image.model_copy(update={"references": None, **update})
    return build_image_tool(spec, models_dir)


def _close(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _count_batches(dit) -> list[int]:
    """The batch of each call of the real DiT."""
    batches: list[int] = []
    dit.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    return batches


def test_both_kinds_pair_every_step_and_draw_the_unbatched_picture(models_dir) -> None:
    plain = _tool(models_dir)
    batched = _tool(models_dir, cfg_batch=True)
    steps = plain.spec.steps
    assert plain.spec.guidance > 1
    a, b = plain.draw("a pot", seed=3), batched.draw("a pot", seed=3)
    assert "cfg_batch" not in a.details
    assert b.details["cfg_batch"] == {"paired": steps, "unpaired": 0, "wasted": 0}
    assert _close(a.image, b.image) <= 1  # uint8 pixels: the same picture up to a batched matmul's rounding
    c = plain.draw("a pot", kind="continue", references=[a.image], seed=5)
    d = batched.draw("a pot", kind="continue", references=[a.image], seed=5)
    assert d.pipeline == "video2world" and d.details["cfg_batch"] == {"paired": steps, "unpaired": 0, "wasted": 0}
    assert _close(c.image, d.image) <= 1
    # The pipelines are their own again after each draw.
    for pipe in (batched.text2image, batched.video2world):
        assert "encode_prompt" not in pipe.__dict__
        assert isinstance(pipe.transformer, torch.nn.Module)


def test_the_dit_runs_once_per_step_on_a_batch_of_two(models_dir) -> None:
    tool = _tool(models_dir, cfg_batch=True)
    batches = _count_batches(tool.text2image.transformer)
    tool.draw("a pot", seed=1)
    assert batches == [2] * tool.spec.steps
    off = _tool(models_dir)
    batches = _count_batches(off.text2image.transformer)
    off.draw("a pot", seed=1)
    assert batches == [1] * (2 * off.spec.steps)


def test_without_guidance_nothing_is_batched(models_dir) -> None:
    tool = _tool(models_dir, cfg_batch=True, guidance=1.0)
    drawing = tool.draw("a pot", seed=1)
    assert "cfg_batch" not in drawing.details


def test_with_the_first_block_cache_the_pair_is_one_branch(models_dir) -> None:
    tool = _tool(models_dir, cfg_batch=True, first_block_cache=1.0)
    drawing = tool.draw("a pot", seed=3)
    stats = drawing.details["first_block_cache"]
    assert stats["computed"] + stats["skipped"] == tool.spec.steps  # one DiT call per step
    assert stats["computed"] >= 1 and stats["skipped"] > 0
    assert drawing.details["cfg_batch"]["paired"] == tool.spec.steps


def test_an_unrecognised_call_runs_as_the_pipeline_asked(models_dir) -> None:
    tool = _tool(models_dir)
    dit = tool.text2image.transformer
    cond, uncond = torch.randn(1, 32, 32), torch.randn(1, 32, 32)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, 1, 8, 8, generator=g)
    inputs = dict(hidden_states=hidden, timestep=torch.tensor([0.5]), padding_mask=torch.zeros(1, 1, 64, 64))
    with torch.no_grad():
        want_c = dit(**inputs, encoder_hidden_states=cond, return_dict=False)[0]
        want_u = dit(**inputs, encoder_hidden_states=uncond, return_dict=False)[0]
        want_other = dit(**dict(inputs, hidden_states=hidden + 1), encoder_hidden_states=uncond, return_dict=False)[0]
        paired = _PairedDiT(dit)
        paired.arm(cond, uncond)
        got = paired(**inputs, encoder_hidden_states=cond, return_dict=False)[0]
        torch.testing.assert_close(got, want_c, rtol=1e-4, atol=1e-4)
        # The second call's latents differ from the first's: the DiT runs on them, not the kept half.
        other = paired(**dict(inputs, hidden_states=hidden + 1), encoder_hidden_states=uncond, return_dict=False)[0]
        torch.testing.assert_close(other, want_other, rtol=1e-4, atol=1e-4)
        assert (paired.paired, paired.unpaired, paired.wasted) == (0, 1, 1)  # a batch of two, then a third call
        # A pair that matches is served from the batch.
        paired(**inputs, encoder_hidden_states=cond, return_dict=False)
        got_u = paired(**inputs, encoder_hidden_states=uncond, return_dict=False)[0]
        torch.testing.assert_close(got_u, want_u, rtol=1e-4, atol=1e-4)
        assert (paired.paired, paired.unpaired, paired.wasted) == (1, 1, 1)
        # return_dict=True, positional arguments, or states it was not armed with: the DiT's own call.
        out = paired(**inputs, encoder_hidden_states=cond)
        torch.testing.assert_close(out.sample, want_c)
        paired(**inputs, encoder_hidden_states=torch.randn(1, 32, 32), return_dict=False)
        assert (paired.paired, paired.unpaired) == (1, 3)
    assert paired.dtype == dit.dtype and paired.config is dit.config  # the rest is the DiT's


def test_a_failed_call_leaves_the_pipeline_as_it_was(models_dir) -> None:
    tool = _tool(models_dir, cfg_batch=True)
    pipe = tool.text2image
    dit = pipe.transformer
    with pytest.raises(RuntimeError, match="stop"):
        with one_batch(pipe):
            raise RuntimeError("stop")
    assert pipe.transformer is dit and "encode_prompt" not in pipe.__dict__
    assert tool.draw("a pot", seed=2).details["cfg_batch"]["paired"] == tool.spec.steps


def test_preset_switch_is_checked() -> None:
    assert ImageSpec(text2image="a", video2world="b").cfg_batch is False
    with pytest.raises(ValueError, match="cfg_batch applies to the local cosmos2 family only"):
        ImageSpec(family="flux2-klein", model="x", cfg_batch=True)
    with pytest.raises(ValueError, match="cfg_batch applies to the local cosmos2 family only"):
        ImageSpec(backend="openai-images", base_url="http://127.0.0.1:1/v1", model="m", cfg_batch=True)


def test_a_batch_that_runs_out_of_memory_falls_back_to_the_pipelines_calls(models_dir, monkeypatch) -> None:
    """Two halves need a second set of activations: when the batch of two runs out of GPU memory (here a
    test double raises torch's OutOfMemoryError for any batch of two), the draw goes on with the
    pipeline's own two calls, batches no more, and says so; the picture is the unbatched one."""
    plain = _tool(models_dir).draw("a pot", seed=3)
    tool = _tool(models_dir, cfg_batch=True)
    dit = tool.text2image.transformer

    def no_room_for_two(module, args, kwargs):
        if kwargs["hidden_states"].shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test double)")

    dit.register_forward_pre_hook(no_room_for_two, with_kwargs=True)
    drawing = tool.draw("a pot", seed=3)
    assert drawing.details["cfg_batch"] == {
        "paired": 0, "unpaired": 2 * tool.spec.steps, "wasted": 0, "out_of_memory": True,
    }  # fmt: skip
    assert _close(plain.image, drawing.image) == 0
