"""``offload``: the running model's weights on the device, the others waiting on the CPU.

On this CPU both places are the CPU, so the tests check the bookkeeping on the real code path (who
is resident when, how often a role is loaded) and that answers do not change."""

from __future__ import annotations

import pytest

from duogen_agents import Agent
from duogen_agents.models.residency import Residency, residency_for
from duogen_agents.presets import load_preset


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-cache"])
def test_offloaded_agent_answers_the_same_and_switches_roles(tmp_path, static) -> None:
    """``static``: the planner decodes on its static KV cache, the compiled path's (``planner.compile``,
    whose step on a CPU runs eagerly; the CUDA graphs need the arena's fixed addresses, tested below)."""
    plain = Agent.from_preset("tiny", home=tmp_path / "a")
    preset = load_preset("tiny").model_copy(update={"offload": True})
    agent = Agent.from_preset(preset, home=tmp_path / "b")
    if static:
        agent.planner.spec = agent.planner.spec.model_copy(update={"compile": True})
    res = residency_for(agent.planner.device)
    main = agent.image_tool.main
    assert main.residency is res and agent.planner.residency_role in res.roles
    assert {f"text2image:{id(main)}", f"video2world:{id(main)}"} <= set(res.roles)
    seen: list[str | None] = []
    draw = agent.image_tool.draw

    def spy(prompt, *a, **kw):
        seen.append(res.active)
        out = draw(prompt, *a, **kw)
        seen.append(res.active)
        return out

    agent.image_tool.draw = spy
    loads = res.loads
    a = agent.run("How do I repot a plant?", mode="visual-plan", seed=3)
    b = plain.run("How do I repot a plant?", mode="visual-plan", seed=3)
    assert len(a.images) == len(b.images) > 0
    # the same answer: texts, and pictures to the bit (their content ids, which the planner reads)
    assert [blk.text for blk in a.blocks if blk.type == "text"] == [blk.text for blk in b.blocks if blk.type == "text"]
    assert [blk.image.id for blk in a.images] == [blk.image.id for blk in b.images]
    assert res.active == agent.planner.residency_role  # the planner wrote the last action
    assert any(s is not None and s.startswith(("text2image", "video2world")) for s in seen[1::2])
    assert res.loads - loads >= 2 * len(a.images)  # planner -> image -> planner for each picture
    assert (agent.planner._static is not None) == static


def test_weights_move_and_come_back() -> None:
    import torch

    lin, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    before = lin.weight.detach().clone()
    res = Residency("cpu")
    res.register("a", [lin])
    res.register("b", [other])
    res.use("a")
    assert res.active == "a" and torch.equal(lin.weight, before)
    res.use("b")
    res.use("a")
    assert torch.equal(lin.weight, before) and res.loads == 3
    del other
    res.use("a")
    res.use("b")  # a dropped model's role is gone, not an error
    assert "b" not in res.roles or not res.modules("b")


def test_the_used_role_is_loaded_and_the_others_at_home() -> None:
    """A load is a copy of the pinned home (on a GPU, the device copy): it happens for the role used
    and only for it. (``t.data`` is a new object at each read, which once hid that no load happened.)"""
    import torch

    lin, other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    before = lin.weight.detach().clone()
    res = Residency("cpu")
    res.register("a", [lin])
    res.register("b", [other])
    home = lambda t: t._duogen_home.data_ptr()  # noqa: E731
    at_home = lambda m: all(t.data_ptr() == home(t) for t in (m.weight, m.bias))  # noqa: E731
    loaded = lambda m: all(t.data_ptr() != home(t) for t in (m.weight, m.bias))  # noqa: E731
    assert at_home(lin) and at_home(other)
    res.use("a")
    assert loaded(lin) and at_home(other)
    res.use("b")
    assert at_home(lin) and loaded(other) and torch.equal(lin.weight, before)
    res.use("a")
    assert loaded(lin) and at_home(other) and torch.equal(lin.weight, before) and res.loads == 3


def test_cpu_copies_are_packed_into_slabs(monkeypatch) -> None:
    """The copies are views into a few slabs (pinned memory is rounded up to a power of two per
    allocation, so one allocation per tensor would lock up to twice the weights); values are kept,
    a tensor larger than a slab gets its own, and ``release`` leaves every model resident."""
    import torch

    from duogen_agents.models import residency

    monkeypatch.setattr(residency, "SLAB_BYTES", 4096)
    a = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16, bias=False))  # 1 KiB, 1 KiB, 64 B
    big = torch.nn.Linear(64, 32)  # 8 KiB: larger than a slab
    half = torch.nn.Linear(16, 16).to(torch.bfloat16)
    before = {id(t): t.detach().clone() for m in (a, big, half) for t in m.parameters()}
    res = Residency("cpu")
    res.register("a", [a, half, a[0]])  # a[0]'s tensors are a's too: one copy each
    res.register("big", [big])
    slabs = {}
    for m in (a, big, half):
        for t in m.parameters():
            home = t._duogen_home
            assert torch.equal(t, before[id(t)]) and home.dtype == t.dtype and home.shape == t.shape
            assert (home.data_ptr() - home.untyped_storage().data_ptr()) % 256 == 0
            slabs.setdefault(home.untyped_storage().data_ptr(), []).append(home.untyped_storage().nbytes())
    # role a: 1024 + 64 + 1024 + 512 + 32 bytes (each rounded up to 256) in one slab; big: 8192 + 128 in two
    assert sorted(v[0] for v in slabs.values()) == [256, 3072, 8192]
    res.use("a")
    res.use("big")
    res.release()
    assert not res.roles and res.active is None
    for m in (a, big, half):
        for t in m.parameters():
            assert not hasattr(t, "_duogen_home") and torch.equal(t, before[id(t)])
    res.use("a")  # forgotten: nothing moves
    assert res.loads == 2


def _ptrs(*modules) -> list[int]:
    return [t.data_ptr() for m in modules for t in list(m.parameters()) + list(m.buffers())]


def _inside(arena, *modules) -> bool:
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    return all(lo <= p < hi for p in _ptrs(*modules))


def test_roles_take_turns_in_one_arena_and_come_back_at_the_same_addresses() -> None:
    """A CUDA graph replays against the addresses it captured: a role's weights must come back to
    the same place at every load. The roles share one arena the size of the largest."""
    import torch

    torch.manual_seed(0)
    planner = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32))  # 4,352 + 256 bytes
    dit = torch.nn.Linear(16, 16).to(torch.bfloat16)  # 512 + 32 bytes
    values = {id(t): t.detach().clone() for m in (planner, dit) for t in m.parameters()}
    res = Residency("cpu")
    res.register("planner", [planner])
    res.register("dit", [dit])
    assert res.arena is None  # nothing is allocated before a role runs
    with torch.inference_mode():  # as the planner runs; the image pipelines later copy in outside it
        res.use("planner")
    assert not res.arena.is_inference()
    # the largest role's span, each tensor at a multiple of 256 bytes: weight, bias (128), norm's two (128)
    assert res.arena.numel() == res.arena_bytes() == 4096 + 256 + 256 + 128
    first = _ptrs(planner)
    assert _inside(res.arena, planner)
    res.use("dit")
    assert _inside(res.arena, dit)
    assert all(t.data_ptr() == t._duogen_home.data_ptr() for t in planner.parameters())  # home again
    res.use("planner")
    assert _ptrs(planner) == first and res.loads == 3
    for m in (planner, dit):
        for t in m.parameters():
            assert torch.equal(t, values[id(t)])
    x = torch.randn(2, 32)
    res.use("dit")
    res.use("planner")
    assert _ptrs(planner) == first
    w, b, g, beta = (values[id(t)] for t in planner.parameters())
    with torch.no_grad():
        assert torch.equal(planner(x), torch.nn.functional.layer_norm(x @ w.T + b, (32,), g, beta))


def test_a_tensor_two_roles_share_keeps_its_place_and_is_not_copied_again(monkeypatch) -> None:
    """The two Cosmos pipelines share the text encoder and the VAE: switching between them copies
    only the DiT, which takes the other DiT's place."""
    import torch

    text, vae = torch.nn.Linear(32, 32), torch.nn.Linear(8, 8)
    dit_a, dit_b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    values = {id(t): t.detach().clone() for m in (text, vae, dit_a, dit_b) for t in m.parameters()}
    res = Residency("cpu")
    res.register("t2i", [text, dit_a, vae])
    res.register("v2w", [text, dit_b, vae])
    res.use("t2i")
    shared = _ptrs(text, vae)
    at_a = _ptrs(dit_a)
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(
        torch.Tensor, "copy_", lambda self, src, **kw: copies.append(src.shape) or real_copy(self, src, **kw)
    )
    res.use("v2w")
    assert _ptrs(text, vae) == shared  # stayed in place
    assert sorted(copies) == sorted([dit_b.weight.shape, dit_b.bias.shape])  # only the DiT came in
    assert _ptrs(dit_b) == at_a  # in the other DiT's place: the arena is the larger role, not the sum
    assert res.arena.numel() == res.arena_bytes() == 4096 + 256 + 1024 + 256 + 256 + 32
    for m in (text, vae, dit_b):
        for t in m.parameters():
            assert torch.equal(t, values[id(t)])
    res.use("t2i")
    for m in (text, vae, dit_a):
        for t in m.parameters():
            assert torch.equal(t, values[id(t)])


def test_a_larger_role_registered_later_grows_the_arena() -> None:
    import torch

    small, big = torch.nn.Linear(4, 4), torch.nn.Linear(64, 64)
    values = {id(t): t.detach().clone() for m in (small, big) for t in m.parameters()}
    res = Residency("cpu")
    res.register("small", [small])
    res.use("small")
    assert res.arena.numel() == 256 + 16
    res.register("big", [big])  # every role goes home; the next use allocates the larger arena
    assert res.arena is None and res.active is None
    assert all(t.data_ptr() == t._duogen_home.data_ptr() for t in small.parameters())
    res.use("small")
    assert res.arena.numel() == 64 * 64 * 4 + 256 and _inside(res.arena, small)
    res.use("big")
    for m in (small, big):
        for t in m.parameters():
            assert torch.equal(t, values[id(t)])


def test_the_arena_shrinks_at_the_next_switch_after_the_largest_role_is_dropped() -> None:
    import gc

    import torch

    big, a, b = torch.nn.Linear(64, 64), torch.nn.Linear(4, 4), torch.nn.Linear(8, 8)
    values = {id(t): t.detach().clone() for m in (a, b) for t in m.parameters()}
    res = Residency("cpu")
    for name, m in (("big", big), ("a", a), ("b", b)):
        res.register(name, [m])
    res.use("a")
    assert res.arena.numel() == 64 * 64 * 4 + 256  # the largest role's size
    del big
    gc.collect()
    res.use("b")
    assert set(res.roles) == {"a", "b"}
    assert res.arena.numel() == res.arena_bytes() == 8 * 8 * 4 + 32 and _inside(res.arena, b)
    assert all(t.data_ptr() == t._duogen_home.data_ptr() for t in a.parameters())  # a went home
    res.use("a")
    assert _inside(res.arena, a)
    for m in (a, b):
        for t in m.parameters():
            assert torch.equal(t, values[id(t)])


def test_compiled_modules_are_not_recompiled_across_offloads() -> None:
    """The DiT's regional compile and the planner's compiled decode step see their weights change
    place at every offload: the guards torch.compile installs must still hold (no recompilation)."""
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    net, other = (
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)),
        torch.nn.Linear(8, 8),
    )
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = net(x)
    compiled = torch.compile(net, backend="aot_eager", dynamic=False)
    res = Residency("cpu")
    res.register("net", [net])
    res.register("other", [other])
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(3):
            res.use("net")
            assert torch.equal(compiled(x), want)
            res.use("other")
    torch._dynamo.reset()


def test_offload_and_the_cuda_graph_decode_go_together() -> None:
    """Since the arena keeps addresses, a preset may offload with ``planner.compile`` on."""
    preset = load_preset("tiny")
    both = preset.model_validate(
        {**preset.model_dump(), "offload": True, "planner": {**preset.planner.model_dump(), "compile": True}}
    )
    assert both.offload and both.planner.compile


def test_tensors_put_in_after_register_and_a_role_registered_again_keep_their_values() -> None:
    """A buffer put into a shared module after its first role registered (placed by a later role
    only) must not be overwritten while the first role runs; a parameter replaced after register is
    left where it is; a role name registered again sends its earlier modules out of the arena."""
    import torch

    shared, big = torch.nn.Linear(4, 4), torch.nn.Linear(64, 64)
    res = Residency("cpu")
    res.register("z", [shared, big])
    shared.register_buffer("extra", torch.arange(16.0))
    res.register("y", [shared])  # gives `extra` a home and a place in y's layout only
    res.use("y")
    res.use("z")
    assert torch.equal(shared.extra, torch.arange(16.0)) and not res._in_arena(shared.extra)

    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    res = Residency("cpu")
    res.register("a", [a])
    res.register("b", [b])
    res.use("a")
    a.weight = torch.nn.Parameter(torch.ones(4, 4))
    res.use("b")
    res.use("a")
    assert torch.equal(a.weight, torch.ones(4, 4))

    p1, p2, image = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
    w1 = p1.weight.detach().clone()
    res = Residency("cpu")
    res.register("planner", [p1])
    res.register("image", [image])
    res.use("planner")
    res.register("planner", [p2])  # the same name again (an id() reused), p1 still alive
    res.use("image")
    assert torch.equal(p1.weight, w1) and not res._in_arena(p1.weight)
