"""First Block Cache on the real Cosmos DiT class: exact when nothing is skipped, the full result when
a step repeats, one state per guidance branch, and the tools record what it skipped."""

from __future__ import annotations

import pytest
import torch

from duogen_agents.models.images.step_cache import FirstBlockCache
from duogen_agents.presets import ImageSpec, load_preset
from duogen_agents.training.stage2 import new_transformer


def _dit(seed: int = 0):
    torch.manual_seed(seed)
    return new_transformer(32).eval()  # the shapes preset's DiT class and shape: 4 blocks


def _inputs(seed: int = 1, t: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 17, 2, 8, 8, generator=g)
    context = torch.randn(1, 6, 32, generator=g)
    return hidden, torch.tensor([t]), context


def _call(dit, hidden, t, context):
    return dit(
        hidden_states=hidden, timestep=t, encoder_hidden_states=context, fps=16,
        padding_mask=torch.zeros(1, 1, 16, 16), return_dict=False,
    )[0]  # fmt: skip


@torch.no_grad()
def test_nothing_skipped_is_exactly_the_uncached_dit() -> None:
    plain, cached = _dit(), _dit()
    cache = FirstBlockCache.attach(cached, 1e-9)
    for t in (0.9, 0.7, 0.5):
        hidden, ts, context = _inputs(t=t)
        assert torch.equal(_call(cached, hidden, ts, context), _call(plain, hidden, ts, context))
    assert cache.counts() == {"computed": 3, "skipped": 0}


@torch.no_grad()
def test_a_repeated_step_is_skipped_and_gives_the_full_result() -> None:
    plain, cached = _dit(), _dit()
    cache = FirstBlockCache.attach(cached, 0.05)
    hidden, ts, context = _inputs()
    full = _call(plain, hidden, ts, context)
    first = _call(cached, hidden, ts, context)
    again = _call(cached, hidden, ts, context)  # the first block's residual is unchanged: skipped
    assert cache.counts() == {"computed": 1, "skipped": 1}
    assert torch.equal(first, full)
    torch.testing.assert_close(again, full, rtol=1e-4, atol=1e-5)
    far = _call(cached, torch.randn_like(hidden), torch.tensor([0.1]), context)  # a large change: computed
    assert cache.counts() == {"computed": 2, "skipped": 1}
    assert not torch.allclose(far, full)
    cache.reset()
    _call(cached, hidden, ts, context)
    assert cache.counts() == {"computed": 1, "skipped": 0}


@torch.no_grad()
def test_guidance_branches_keep_their_own_state() -> None:
    dit = _dit()
    cache = FirstBlockCache.attach(dit, 0.05)
    hidden, ts, cond = _inputs()
    uncond = torch.zeros_like(cond)
    for _ in range(2):  # a guided step: conditional then unconditional call, twice
        _call(dit, hidden, ts, cond)
        _call(dit, hidden, ts, uncond)
    # each branch computed once and then skipped, never compared with the other branch's residual
    assert cache.counts() == {"computed": 2, "skipped": 2}
    assert len(cache.branches) == 2


def test_blocks_keep_their_names_and_modules() -> None:
    plain, cached = _dit(), _dit()
    blocks = list(cached.transformer_blocks)
    FirstBlockCache.attach(cached, 0.1)
    assert list(cached.state_dict()) == list(plain.state_dict())
    assert list(cached.transformer_blocks) == blocks  # outside the forward: the blocks themselves
    cached.load_state_dict(plain.state_dict())


def test_attach_refuses_what_it_cannot_cache() -> None:
    with pytest.raises(ValueError, match="threshold must be > 0"):
        FirstBlockCache.attach(_dit(), 0.0)
    with pytest.raises(ValueError, match="at least 2 transformer_blocks"):
        FirstBlockCache.attach(torch.nn.Linear(2, 2), 0.1)


def test_preset_switch_is_checked() -> None:
    with pytest.raises(ValueError, match="first_block_cache applies to the local cosmos2 and aligned"):
        ImageSpec(family="flux2-klein", model="x", first_block_cache=0.1)
    with pytest.raises(ValueError):
        ImageSpec(text2image="a", video2world="b", first_block_cache=1.5)
    assert ImageSpec(text2image="a", video2world="b").first_block_cache == 0.0


def test_the_cosmos_tool_records_what_the_cache_skipped(models_dir, tmp_path) -> None:
    from duogen_agents.models.images import build_image_tool

    spec = load_preset("tiny").image.model_copy(update={"first_block_cache": 1.0, "references": None})
    tool = build_image_tool(spec, models_dir)
    drawing = tool.draw("a pot", seed=3)
    stats = drawing.details["first_block_cache"]
    calls = spec.steps * (2 if spec.guidance > 1 else 1)
    assert stats["threshold"] == 1.0 and stats["computed"] + stats["skipped"] == calls
    assert stats["skipped"] > 0 and stats["computed"] >= 2  # each branch computes its first call
    again = tool.draw("a pot", seed=3)  # a new draw starts from nothing
    assert again.details["first_block_cache"] == stats
    assert drawing.image.tobytes() == again.image.tobytes()
    moved = tool.draw("a pot", kind="continue", references=[drawing.image], seed=3)
    assert moved.pipeline == "video2world" and moved.details["first_block_cache"]["skipped"] > 0


@torch.no_grad()
def test_release_frees_the_kept_tensors_and_keeps_the_counts() -> None:
    dit = _dit()
    cache = FirstBlockCache.attach(dit, 0.05)
    hidden, ts, context = _inputs()
    _call(dit, hidden, ts, context)
    assert cache.branches and cache.counts() == {"computed": 1, "skipped": 0}
    cache.release()
    assert not cache.branches and cache.counts() == {"computed": 1, "skipped": 0}
    _call(dit, hidden, ts, context)  # nothing kept: computed again
    assert cache.counts() == {"computed": 2, "skipped": 0}


def test_training_runs_every_block_and_detach_restores_the_dit() -> None:
    plain, cached = _dit(), _dit()
    cache = FirstBlockCache.attach(cached, 1.0)
    hidden, ts, context = _inputs()
    with torch.enable_grad():
        for _ in range(2):
            out = _call(cached, hidden, ts, context)
    assert cache.counts() == {"computed": 0, "skipped": 0}  # the cache stayed out of the way
    torch.testing.assert_close(out, _call(plain, hidden, ts, context))
    FirstBlockCache.detach(cached)
    assert type(cached.transformer_blocks) is torch.nn.ModuleList and not hasattr(cached, "_first_block_cache")
    assert list(cached.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        _call(cached, hidden, ts, context)
    assert cache.counts() == {"computed": 0, "skipped": 0}  # no hooks left
