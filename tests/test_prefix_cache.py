"""Prefix reuse in the planner: same outputs as a full prefill, and prefill that stays flat.

Runs the real decode loop of ``TransformersPlanner`` on the tiny Qwen2.5-VL and Qwen3-VL planners."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from duogen_agents.graphs import actions as A
from duogen_agents.models.decoding import (
    CachedPrefix,
    StringLimits,
    common_prefix,
    in_string_lengths,
    split_limits,
    utf8_fragment_ok,
    utf8_refusals,
)
from duogen_agents.models.planner import TransformersPlanner
from duogen_agents.presets import load_preset

REFS = ["0123456789ab", "ba9876543210"]


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3"])
def planners(request, tmp_path_factory):
    """The same weights twice: one planner that keeps caches, one that never does."""
    from duogen_agents.models.tiny import ensure_tiny_planner

    root = tmp_path_factory.mktemp("planner-models")
    ensure_tiny_planner(root, "qwen3_vl" if request.param == "tiny-qwen3" else "qwen2_5_vl")
    spec = load_preset(request.param).planner
    cached = TransformersPlanner.from_spec(spec, root)
    plain = TransformersPlanner(cached.model, cached.processor, spec.model_copy(update={"prefix_cache": 0}))
    return cached, plain


def _picture(i: int) -> Image.Image:
    return Image.new("RGB", (24 + 8 * (i % 2), 24), ((40 * i) % 256, 90, 200 - (15 * i) % 200))


def _session_calls(turns: int):
    """Conversations of a growing session: each turn a user message with a picture, and the
    assistant's earlier answers in the history."""
    conv = [{"role": "system", "content": [{"type": "text", "text": "You plan."}]}]
    for i in range(turns):
        conv.append(
            {
                "role": "user",
                "content": [{"type": "image", "image": _picture(i)}, {"type": "text", "text": f"Step {i}: go on."}],
            }
        )
        yield conv
        conv.append(
            {"role": "assistant", "content": [{"type": "text", "text": f'{{"type": "text", "text": "ok {i}"}}'}]}
        )


def test_outputs_match_a_full_prefill_and_prefill_stays_flat(planners) -> None:
    cached, plain = planners
    schema = A.next_action_schema(REFS, max_text=24, max_prompt=16, max_refs=1, allow_image=True, allow_done=True)
    prefills, prompts = [], []
    for i, conv in enumerate(_session_calls(10)):
        with_reuse = cached.generate(conv, schema, seed=i, cache_key="s1")
        without = plain.generate(conv, schema, seed=i, cache_key="s1")
        assert with_reuse.text == without.text
        assert without.prefill_tokens == without.prompt_tokens  # the plain planner prefills everything
        prefills.append(with_reuse.prefill_tokens)
        prompts.append(with_reuse.prompt_tokens)
    assert prompts[9] > 4 * prompts[0]  # the session grew ...
    assert max(prefills[1:]) <= prefills[0] + 8  # ... while each call prefilled about one turn
    assert prefills[9] <= prefills[4] + 4


def test_free_text_and_streaming_match_too(planners) -> None:
    cached, plain = planners
    calls = list(_session_calls(3))
    for i, conv in enumerate(calls):
        pieces: list[str] = []
        a = cached.generate(conv, None, seed=7, max_new_tokens=12, cache_key="free", on_token=pieces.append)
        b = plain.generate(conv, None, seed=7, max_new_tokens=12)
        assert a.text == b.text and "".join(pieces) == a.text
        if i:
            assert a.prefill_tokens < a.prompt_tokens


def test_another_picture_behind_the_same_tokens_is_not_reused(planners) -> None:
    cached, plain = planners
    schema = A.plan_schema(min_steps=1, max_steps=2, max_title=16)
    first = list(_session_calls(3))[-1]
    cached.generate(first, schema, seed=1, cache_key="swap")
    swapped = [dict(turn, content=list(turn["content"])) for turn in first]
    # Same size, other pixels: the token ids are identical, only the picture differs.
    swapped[1]["content"][0] = {"type": "image", "image": Image.new("RGB", _picture(0).size, (0, 255, 0))}
    a = cached.generate(swapped, schema, seed=1, cache_key="swap")
    b = plain.generate(swapped, schema, seed=1)
    assert a.text == b.text
    first_image = cached.encode(swapped)["input_ids"][0].tolist().index(cached.image_token_id)
    assert a.prefill_tokens == a.prompt_tokens - first_image  # cut at the changed picture


def test_sessions_are_bounded_and_forgotten(planners) -> None:
    cached, _ = planners
    conv = next(iter(_session_calls(1)))
    schema = A.plan_schema(min_steps=1, max_steps=2, max_title=8)
    for key in ("a", "b", "c", "d", "e"):
        cached.generate(conv, schema, seed=0, cache_key=key)
    assert list(cached.prefix_cache.entries)[-4:] == ["b", "c", "d", "e"] and "a" not in cached.prefix_cache.entries
    cached.forget("e")
    assert "e" not in cached.prefix_cache.entries
    again = cached.generate(conv, schema, seed=0, cache_key="e")
    assert again.prefill_tokens == again.prompt_tokens
    cached.forget()
    assert not cached.prefix_cache.entries


def test_string_limits_hold_over_many_seeds(planners) -> None:
    cached, _ = planners
    schema = A.step_schema(REFS, max_text=12, max_prompt=6, max_refs=1)
    conv = next(iter(_session_calls(1)))
    for seed in range(20):
        out = cached.generate(conv, schema, seed=seed, cache_key="limits")
        step = A.StepAction.model_validate_json(out.text)
        assert 1 <= len(step.text) <= 12 and 1 <= len(step.image.prompt) <= 6


def test_utf8_fragments_and_refusals() -> None:
    assert utf8_fragment_ok("é".encode()) and utf8_fragment_ok(b"\xa9 ok") and utf8_fragment_ok(b"ab\xe2\x82")
    for bad in (b"\xe0\x9c\x8d", b"\xc0\x80", b"\xed\xa0\x80", b"\xf5", b"a\x80b", b"\xf4\x90\x80\x80"):
        assert not utf8_fragment_ok(bad), bad  # overlong, surrogate, never UTF-8, stray, past U+10FFFF
    vocab = [b'"', b"\xe0", b"\xa4", b"\x9c", b"\xa4\xb9", b"x", b"\xa4x"]
    refused = utf8_refusals(vocab, 8)  # index 7 is past the vocabulary
    allowed = [[not r for r in row] for row in refused]
    assert allowed[0] == [True, True, False, False, False, True, False, False]  # no character begun
    assert allowed[1] == [False, False, True, True, False, False, True, False]  # one continuation byte due
    assert allowed[2] == [False, False, True, True, True, False, False, False]  # two due: one or both
    tracker = StringLimits({})
    tracker.feed(b'{"a": "\xe0')
    assert tracker.need == (0xA0, 0xBF) and tracker.pending == 2
    tracker.feed(b"\xa4")
    assert tracker.need is None and tracker.pending == 1


def test_split_limits_and_the_json_follower() -> None:
    schema = A.step_schema(REFS, max_text=30, max_prompt=10, max_refs=1)
    stripped, limits = split_limits(schema)
    assert limits == {("text",): 30, ("image", "prompt"): 10}
    assert "maxLength" not in json.dumps(stripped)
    follow = StringLimits(limits)
    follow.feed(b'{"text": "ab\\"c')
    assert follow.remaining() == 25  # a, b, the escape (2 bytes) and c
    follow.feed(b'", "image": {"prompt": "x')
    assert follow.remaining() == 9
    follow.feed(b'", "references": ["')
    assert follow.remaining() is None  # an unlimited string
    close = StringLimits(limits)
    close.feed(b'{"text": "' + b"a" * 29 + "é".encode()[:1])
    assert close.remaining() == 1  # at the limit, the character begun may still be completed
    esc = StringLimits(limits)
    esc.feed(b'{"text": "' + b"a" * 29 + b"\\")
    assert esc.remaining() == 1  # and an escape begun within it
    # a token's bytes inside a string: up to its first quote that is not escaped
    assert in_string_lengths([b'ab"c', b'\\":x', b"xyz"], 4) == [2, 4, 3, 1 << 20]


def test_common_prefix_keeps_whole_pictures_only() -> None:
    entry = CachedPrefix(None, [1, 2, 9, 9, 9, 3, 4], [(2, 5, "red")])
    assert common_prefix(entry, [1, 2, 9, 9, 9, 3, 5], [(2, 5, "red")]) == 6
    assert common_prefix(entry, [1, 2, 9, 9, 9, 3, 4, 7], [(2, 5, "blue")]) == 2
    assert common_prefix(entry, [1, 2, 9, 9, 8], [(2, 4, "red")]) == 2


def test_the_static_cache_path_gives_the_same_outputs(planners) -> None:
    """``planner.compile``: one static KV cache shared by the sessions (its step compiled on a GPU)."""
    cached, plain = planners
    static = TransformersPlanner(cached.model, cached.processor, cached.spec.model_copy(update={"compile": True}))
    schema = A.next_action_schema(REFS, max_text=24, max_prompt=16, max_refs=1, allow_image=True, allow_done=True)
    calls = list(_session_calls(4))
    for i, conv in enumerate(calls):
        for key in ("s1", "s2"):  # two sessions take turns on the one static cache
            a = static.generate(conv, schema, seed=i, cache_key=key)
            b = plain.generate(conv, schema, seed=i)
            assert (a.text, a.forced_tokens) == (b.text, b.forced_tokens) and a.forced_tokens > 0
            if key == "s1" and i:
                assert a.prefill_tokens == a.prompt_tokens  # s2 used the static cache since
            if key == "s2" and i:
                assert a.prefill_tokens == a.prompt_tokens
        again = static.generate(calls[i], schema, seed=i, cache_key="s2")
        assert again.prefill_tokens < again.prompt_tokens
    assert list(static.prefix_cache.entries) == ["s2"]


def test_the_torch_bitmask_unpacking_matches_xgrammar() -> None:
    """The GPU path of ``apply_bitmask`` (plain torch ops), checked against xgrammar's kernel."""
    import torch
    import xgrammar as xgr

    from duogen_agents.models.decoding import allowed_tokens

    vocab = 1000
    torch.manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, (vocab + 31) // 32), dtype=torch.int32)
    logits = torch.randn(vocab)
    expected = logits.clone().unsqueeze(0)
    xgr.apply_token_bitmask_inplace(expected, bitmask)
    got = logits.clone().masked_fill_(~allowed_tokens(bitmask, vocab, "cpu"), float("-inf"))
    assert torch.equal(got, expected[0])


def test_compile_is_ignored_off_a_gpu(tmp_path) -> None:
    """``compile`` is a GPU switch: on the CPU the planner decodes eagerly on its dynamic cache and
    the DiT's blocks stay uncompiled (compiling there costs more than it saves)."""
    import torch

    from duogen_agents.models.images import compile_dit
    from duogen_agents.models.tiny import ensure_tiny_planner

    ensure_tiny_planner(tmp_path, "qwen2_5_vl")
    spec = load_preset("tiny").planner.model_copy(update={"compile": True, "device": "cpu"})
    planner = TransformersPlanner.from_spec(spec, tmp_path)
    assert planner.spec.compile is False and spec.compile is True  # the caller's spec is not changed
    out = planner.generate(list(_session_calls(1))[0], None, max_new_tokens=4, seed=0, cache_key="s")
    assert out.num_tokens == 4 and planner._static is None and planner._compiled_step is None

    block = torch.nn.Linear(4, 4)
    dit = torch.nn.Module()
    dit.transformer_blocks = torch.nn.ModuleList([block])
    assert compile_dit(dit) is False
    assert dit.transformer_blocks[0]._compiled_call_impl is None


def test_each_picture_is_processed_once_per_session(planners) -> None:
    """``encode`` keeps the processed template pieces with pictures (by digest): a growing session
    runs the image processor on its new picture only, the result is the one a fresh processing
    gives, and another picture of the same size behind the same tokens is processed anew."""
    import torch

    cached, _ = planners
    cached.forget()  # all sessions: the processed pictures too

    class Counting:
        def __init__(self, inner):
            self.inner, self.pictures = inner, 0

        def __call__(self, *a, **kw):
            self.pictures += len(kw.get("images") or [])
            return self.inner(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    processor = cached.processor
    cached.processor = counting = Counting(processor)
    try:
        seen = []
        for conv in _session_calls(4):
            counting.pictures = 0
            got = cached.encode(conv)
            seen.append(counting.pictures)
            counting.pictures = 0
            fresh = cached.encode(conv, reuse=False)
            assert counting.pictures == len(got["image_digests"])  # reuse=False processes every picture
            assert got.keys() == fresh.keys()
            for k, v in fresh.items():
                assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, k
        assert seen == [1, 1, 1, 1]  # the session's new picture alone
        swapped = [dict(turn, content=list(turn["content"])) for turn in conv]
        swapped[1]["content"][0] = {"type": "image", "image": Image.new("RGB", _picture(0).size, (0, 255, 0))}
        counting.pictures = 0
        got = cached.encode(swapped)
        assert counting.pictures == 1
        assert torch.equal(got["pixel_values"], cached.encode(swapped, reuse=False)["pixel_values"])
    finally:
        cached.processor = processor
    assert cached._pieces and cached._piece_total > 0
    cached.forget()
    assert not cached._pieces and cached._piece_total == 0
