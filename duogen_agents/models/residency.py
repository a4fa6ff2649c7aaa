"""Offloading: only the running model's weights on the GPU, the others waiting in pinned CPU memory.

A 7B planner (about 16.6 GB in bf16) and Cosmos-Predict2-2B with its T5-XXL text encoder (about
13.7 GB) do not fit a 24 GB card together, but each fits alone, and one process drives one GPU one
model at a time anyway (``serial.device_turn``). With ``offload = true`` in a preset, each model
registers as a *role* (the planner; each image pipeline with its text encoder, DiT and VAE); before a
role runs, ``Residency.use`` sends the weights of every other role back to their pinned CPU copies
(free: the copies never change, inference does not write weights) and copies the role's own in (a
picture's pipeline, 13.7 GB, took about 0.3-0.4 s more offloaded than resident on an H200). KV caches
stay on the GPU. The copies of every role stay in pinned host memory, so the host needs about the
weights' whole size in RAM.

The roles take turns in one *arena*: a single device buffer the size of the largest role, allocated
once. Each tensor has a fixed place in it (a tensor two roles share, such as the text encoder of both
Cosmos pipelines, the same place in both, so switching between them copies only what differs), so a
role's weights come back at the same addresses every time. That is what lets the planner's CUDA-graph
decode (``planner.compile``) run offloaded: a captured graph replays only at the addresses it captured,
and at new ones torch records the graphs again (at every load, keeping the old ones). It also keeps
the weights out of the caching allocator, whose blocks a thousand tensors of every size, freed and
allocated at each switch, would fragment. The price: while a smaller role runs,
the arena still holds the largest one's size. It grows when a larger role registers, and shrinks at
the next switch after the largest role's models are dropped.
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
        self.layouts: dict[str, dict[int, int]] = {}  # role -> id(tensor) -> its byte offset in the arena
        self.arena: Any = None  # uint8 on the device, allocated at the first use after a role grew it
        self.active: str | None = None
        self.loads = 0  # host-to-device loads of a role, for tests and benchmarks

    def register(self, role: str, modules: list[Any]) -> None:
        """Add a role and send its modules to pinned CPU memory until it is used."""
        kept = [m for m in modules if m is not None]
        for m in self.modules(role):  # a name registered again: its earlier modules leave the arena
            self._offload(m)
        tensors = _role_tensors(kept)
        self.roles[role] = [weakref.ref(m) for m in kept]
        _homes(tensors)
        self.layouts[role] = _place(tensors)
        for m in kept:
            self._offload(m)
        # What was sent home may be the running role's too (a module of both): it is loaded again at
        # its next ``use``, where whatever stayed in place is not copied again.
        self.active = None
        if self.arena is not None and self.arena_bytes() > self.arena.numel():
            # The arena must grow: every role goes home and the next ``use`` allocates the new one
            # (addresses change once; a captured CUDA graph re-records against the new ones).
            self._all_home()
            self._drop_arena()

    def arena_bytes(self) -> int:
        """The arena's size: the largest role's span (tensors of a role never overlap; roles do)."""
        spans = [
            _end(off, t)
            for role in self.roles
            for t in _role_tensors(self.modules(role))
            if (off := self.layouts[role].get(id(t))) is not None
        ]
        return max(spans, default=0)

    def modules(self, role: str) -> list[Any]:
        return [m for m in (r() for r in self.roles.get(role, [])) if m is not None]

    def use(self, role: str | None) -> None:
        if role is None or role == self.active or role not in self.roles:
            return
        if self._forget_dropped() and self.arena is not None and self.arena_bytes() < self.arena.numel():
            # A role whose models were dropped held the arena's size: every role goes home and this
            # load allocates an arena the size of the largest role left (addresses change once).
            self._all_home()
            self._drop_arena()
            self.active = None
        if role not in self.roles:  # its own models were dropped
            return
        mine = self.modules(role)
        ids = {id(m) for m in mine}
        for other in self.roles:
            if other != role:
                for m in self.modules(other):
                    if id(m) not in ids:
                        self._offload(m)
        self._load(role, mine)
        self.active = role
        self.loads += 1

    def release(self) -> None:
        """Every role's weights back on the device for good, each in its own memory, the roles forgotten
        and their CPU copies and the arena dropped (a benchmark comparing with every model resident);
        they must fit the device together. Whoever set ``residency_role`` or ``residency`` on a model
        clears it."""
        import torch

        modules = [m for role in self.roles for m in self.modules(role)]
        for m in modules:  # out of the arena first, so that it is freed before the copies are made
            self._offload(m)
        self._drop_arena()
        for m in modules:
            for _owner, _name, t in _tensors(m):
                home = getattr(t, "_duogen_home", None)
                if home is None:
                    continue
                t.data = home.to(self.device, copy=True)
                del t._duogen_home
                if hasattr(t, "_duogen_offset"):
                    del t._duogen_offset
        self.roles.clear()
        self.layouts.clear()
        self.active = None
        if torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # the freed slabs would stay pinned in PyTorch's host cache

    def _forget_dropped(self) -> bool:
        """Forget the roles whose models are all gone (garbage-collected); whether there were any."""
        dropped = [role for role in self.roles if not self.modules(role)]
        for role in dropped:
            del self.roles[role]
            self.layouts.pop(role, None)
        return bool(dropped)

    def _all_home(self) -> None:
        for role in self.roles:
            for m in self.modules(role):
                self._offload(m)

    def _in_arena(self, t: Any) -> bool:
        start = self.arena.data_ptr()
        return start <= t.data_ptr() < start + self.arena.numel()

    def _drop_arena(self) -> None:
        if self.arena is None:
            return
        cuda = self.arena.is_cuda
        self.arena = None
        if cuda:  # or the caching allocator keeps its block, and a larger arena is reserved beside it
            import torch

            torch.cuda.empty_cache()

    def _offload(self, module: Any) -> None:
        for _owner, _name, t in _tensors(module):
            home = getattr(t, "_duogen_home", None)
            if home is not None:  # not one put in after ``register`` (it stays where it is)
                t.data = home

    def _load(self, role: str, modules: list[Any]) -> None:
        import torch

        if self.arena is None:
            # A normal tensor even when the first use is inside the planner's inference_mode: the image
            # pipelines copy into it outside it (an inference tensor forbids in-place writes there).
            with torch.inference_mode(False):
                self.arena = torch.empty(max(self.arena_bytes(), 1), dtype=torch.uint8, device=self.device)
        layout = self.layouts[role]
        placed = []
        for t in _role_tensors(modules):
            home = getattr(t, "_duogen_home", None)
            if home is None:  # put in after ``register``: it never left its own memory
                continue
            if id(t) in layout:
                placed.append((t, home, layout[id(t)]))
            elif t.data_ptr() == home.data_ptr() or self._in_arena(t):
                # Not this role's when it registered (put in later, or placed by a role registered
                # since): its own memory, as before the arena, where no copy below can overwrite it.
                t.data = home.to(self.device, copy=True)
        for t, home, off in placed:
            place = self.arena[off : _end(off, home)]
            # Already in its place: it belongs to the role that ran last too, whose tensors do not overlap,
            # so nothing has written there since. (``t.data`` is a new object at each read, so where a
            # tensor is, is told by its data pointer.)
            if t.data_ptr() == place.data_ptr() and t.data_ptr() != home.data_ptr():
                continue
            view = place.view(home.dtype).view(home.shape)
            view.copy_(home, non_blocking=True)  # on a CPU "device" too: a second copy, the same bookkeeping
            t.data = view


def _end(offset: int, t: Any) -> int:
    return offset + t.numel() * t.element_size()


def _role_tensors(modules: list[Any]) -> list[Any]:
    """Every parameter and buffer of ``modules``, each once, in order."""
    return list({id(t): t for m in modules for _owner, _name, t in _tensors(m)}.values())


def _place(tensors: list[Any]) -> dict[int, int]:
    """Each tensor's byte offset in the arena for one role: a tensor placed by an earlier role keeps its
    place (``_duogen_offset``) where no other kept place overlaps it; the rest are packed in order from
    the start, around the kept places, each at a multiple of ``_ALIGN``."""
    kept: list[tuple[int, int, Any]] = []  # (start, end, tensor), disjoint
    for t in tensors:
        off = getattr(t, "_duogen_offset", None)
        if off is None:
            continue
        end = _end(off, t)
        if all(end <= s or off >= e for s, e, _ in kept):
            kept.append((off, end, t))
    kept.sort(key=lambda k: k[0])
    layout = {id(t): s for s, _e, t in kept}
    cursor, i = 0, 0
    for t in tensors:
        if id(t) in layout:
            continue
        n = t.numel() * t.element_size()
        while True:  # the first aligned place at or after the cursor that overlaps no kept place
            while i < len(kept) and kept[i][1] <= cursor:
                i += 1
            if i < len(kept) and kept[i][0] < cursor + n:
                cursor = -(-kept[i][1] // _ALIGN) * _ALIGN
                continue
            break
        layout[id(t)] = cursor
        if getattr(t, "_duogen_offset", None) is None:
            t._duogen_offset = cursor
        cursor += -(-n // _ALIGN) * _ALIGN
    return layout


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
    until its first call. A planner without local weights (a remote one) is left as it is. With
    ``planner.compile`` its weights come back to the same arena addresses at every load, so the
    decode step's CUDA graphs replay without recording again."""
    if getattr(planner, "model", None) is None or not hasattr(planner, "device"):
        return
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
