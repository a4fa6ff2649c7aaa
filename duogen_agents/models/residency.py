"""Offloading: only the running model's weights on the GPU, the others waiting in pinned CPU memory.

A 7B planner (about 16.6 GB in bf16) and Cosmos-Predict2-2B with its T5-XXL text encoder (about
13.7 GB) do not fit a 24 GB card together, but each fits alone, and one process drives one GPU one
model at a time anyway (``serial.device_turn``). With ``offload = true`` in a preset, each model
registers as a *role* (the planner; each image pipeline with its text encoder, DiT and VAE); before a
role runs, ``Residency.use`` sends the weights of every other role back to their pinned CPU copies
(free: the copies never change, inference does not write weights) and loads the role's own (one
host-to-device copy, about 1 s per 16 GB from pinned memory). KV caches stay on the GPU.

Offload and the planner's CUDA-graph decode (``planner.compile``) exclude each other: a captured
graph holds the weights' GPU addresses, and loading gives them new ones.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_LOCK = threading.Lock()
_RESIDENCIES: dict[str, Residency] = {}


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

    def _offload(self, module: Any) -> None:
        import torch

        pin = torch.cuda.is_available()
        for _owner, _name, t in _tensors(module):
            home = getattr(t, "_duogen_home", None)
            if home is None:
                home = t.data.to("cpu", copy=True)
                if pin:
                    home = home.pin_memory()
                t._duogen_home = home
            t.data = home

    def _load(self, module: Any) -> None:
        for _owner, _name, t in _tensors(module):
            home = getattr(t, "_duogen_home", None)
            # ``t.data`` is a new tensor object at each read, so "still at home" is told by its storage.
            if home is not None and t.data_ptr() == home.data_ptr():
                # copy: on a CPU "device" too, so that loaded and at home are told apart there as well
                t.data = home.to(self.device, non_blocking=True, copy=True)


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
