"""``offload``: the running model's weights on the device, the others waiting on the CPU.

On this CPU both places are the CPU, so the tests check the bookkeeping on the real code path (who
is resident when, how often a role is loaded) and that answers do not change."""

from __future__ import annotations

import pytest

from duogen_agents import Agent
from duogen_agents.models.residency import Residency, residency_for
from duogen_agents.presets import load_preset


def test_offloaded_agent_answers_the_same_and_switches_roles(tmp_path) -> None:
    plain = Agent.from_preset("tiny", home=tmp_path / "a")
    preset = load_preset("tiny").model_copy(update={"offload": True})
    agent = Agent.from_preset(preset, home=tmp_path / "b")
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


def test_offload_and_cuda_graph_decode_exclude_each_other() -> None:
    preset = load_preset("tiny")
    with pytest.raises(ValueError, match="offload and planner.compile"):
        preset.model_validate(
            {**preset.model_dump(), "offload": True, "planner": {**preset.planner.model_dump(), "compile": True}}
        )
