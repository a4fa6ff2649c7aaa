"""Offloading: only the running model's weights on the GPU, the others waiting in pinned CPU memory.

A 7B planner (about 16.6 GB in bf16) and Cosmos-Predict2-2B with its T5-XXL text encoder (about
13.7 GB) do not fit a 24 GB card together, but each fits alone, and one process drives one GPU one
model at a time anyway (``serial.device_turn``). With ``offload = true`` in a preset, each model
registers as a *role* (the planner; each image pipeline with its text encoder, DiT and VAE); before a
role runs, ``Residency.use`` sends the weights of every other role back to their pinned CPU copies
(free: the copies never change, inference does not write weights) and loads the role's own (one
host-to-device copy: a picture's pipeline, 13.7 GB, took about 0.3-0.4 s more offloaded than resident on
an H200). KV caches stay on the GPU. The copies of every role stay in pinned host memory, so the host
needs about the weights' whole size in RAM.

Offload and the planner's CUDA-graph decode (``planner.compile``) exclude each other: a captured
graph holds the weights' GPU addresses, and loading gives them new ones.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_LOCK = threading.Lock()
_RESIDENCIES: dict[str, Residency] = {}

# The CPU copies live in pinned slabs of this size, each tensor's copy a view into one. PyTorch's pinned
# allocator rounds every allocation up to a power of two, so pinning tensor by tensor (a 7B model's
# 136 MB matrices become 256 MB each) would lock nearly twice the weights' size in host memory; a slab
# that is a power of two wastes only its unfilled end.
SLAB_BYTES = 2**31
_ALIGN = 256  # bytes: each copy starts at a multiple of this within its slab


def residency_for(device: str) -> Residency:
    from duogen_agents.models.serial import device_key

    key = device_key(device)
    with _LOCK:
        if key not in _RESIDENCIES:
            _RESIDENCIES[key] = Residency(device)
        return _RESIDENCIES[key]


def _tensors(module: Any) -> list[tuple[Any, str, Any]]:
    """(owner module, name, tensor) for every parameter and buffer, each once."""
    seen: set[int] = set()
    out = []
    for owner in module.modules():
        for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out.append((owner, name, t))
    return out


class Residency:
    """Which role's modules are on ``device``. Call ``use`` under the device's turn lock."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.roles: dict[str, list[weakref.ref[Any]]] = {}  # weak: a dropped model leaves
        self.active: str | None = None
        self.loads = 0  # host-to-device loads of a role, for tests and benchmarks

    def register(self, role: str, modules: list[Any]) -> None:
        """Add a role and send its modules to pinned CPU memory until it is used."""
        kept = [m for m in modules if m is not None]
        self.roles[role] = [weakref.ref(m) for m in kept]
        _homes([t for m in kept for _owner, _name, t in _tensors(m)])
        for m in kept:
            self._offload(m)
        if self.active == role:
            self.active = None

    def modules(self, role: str) -> list[Any]:
        return [m for m in (r() for r in self.roles.get(role, [])) if m is not None]

    def use(self, role: str | None) -> None:
        if role is None or role == self.active or role not in self.roles:
            return
        mine = self.modules(role)
        ids = {id(m) for m in mine}
        for other in list(self.roles):
            if other == role:
                continue
            theirs = self.modules(other)
            if not theirs:
                del self.roles[other]
                continue
            for m in theirs:
                if id(m) not in ids:
                    self._offload(m)
        for m in mine:
            self._load(m)
        self.active = role
        self.loads += 1

    def release(self) -> None:
        """Every role's weights back on the device for good, the roles forgotten and their CPU copies
        dropped (a benchmark comparing with every model resident); they must fit the device together.
        Whoever set ``residency_role`` or ``residency`` on a model clears it."""
        import torch

        for role in list(self.roles):
            for m in self.modules(role):
                self._load(m)
                for _owner, _name, t in _tensors(m):
                    if hasattr(t, "_duogen_home"):
                        del t._duogen_home
        self.roles.clear()
        self.active = None
        if torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # the freed slabs would stay pinned in PyTorch's host cache

    def _offload(self, module: Any) -> None:
        for _owner, _name, t in _tensors(module):  # every tensor has its home since ``register``
            t.data = t._duogen_home

    def _load(self, module: Any) -> None:
        for _owner, _name, t in _tensors(module):
            home = getattr(t, "_duogen_home", None)
            # ``t.data`` is a new tensor object at each read, so "still at home" is told by its storage.
            if home is not None and t.data_ptr() == home.data_ptr():
                # A copy on a CPU "device" too (a second copy of the running role there: offloading is
                # for GPUs; on a CPU it only keeps the same bookkeeping).
                t.data = home.to(self.device, non_blocking=True, copy=True)


def _homes(tensors: list[Any]) -> None:
    """Give each tensor without one its CPU copy (``_duogen_home``, pinned where there is CUDA), packed
    in order into slabs of ``SLAB_BYTES`` (a tensor larger than that gets a slab of its own)."""
    import torch

    todo = list({id(t): t for t in tensors if getattr(t, "_duogen_home", None) is None}.values())
    groups: list[tuple[list[tuple[Any, int]], int]] = []  # (tensor, offset) per slab, and its size
    group: list[tuple[Any, int]] = []
    used = 0
    for t in todo:
        n = t.numel() * t.element_size()
        if group and used + n > SLAB_BYTES:
            groups.append((group, used))
            group, used = [], 0
        group.append((t, used))
        used += -(-n // _ALIGN) * _ALIGN
    if group:
        groups.append((group, used))
    pin = torch.cuda.is_available()
    for members, size in groups:
        slab = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=pin)
        for t, offset in members:
            n = t.numel() * t.element_size()
            home = slab[offset : offset + n].view(t.dtype).view(t.shape)
            home.copy_(t.data)
            t._duogen_home = home


def offload_planner(planner: Any) -> None:
    """Make ``planner`` (a ``TransformersPlanner``) a role of its device, its weights on the CPU
    until its first call. A planner without local weights (a remote one) is left as it is."""
    if getattr(planner, "model", None) is None or not hasattr(planner, "device"):
        return
    if getattr(planner.spec, "compile", False):
        from duogen_agents.errors import ConfigError

        raise ConfigError("offload and planner.compile cannot be used together; turn one off")
    role = f"planner:{id(planner)}"
    residency_for(planner.device).register(role, [planner.model])
    planner.residency_role = role


def offload_image_tool(image_tool: Any) -> None:
    """Make each pipeline of the image tool (and of its references family) a role of its device."""
    for tool in (getattr(image_tool, "main", image_tool), getattr(image_tool, "references", None)):
        roles = getattr(tool, "offload_roles", None)
        if roles is None:
            continue
        res = residency_for(tool.device)
        for role, modules in roles().items():
            res.register(role, modules)
        tool.residency = res
