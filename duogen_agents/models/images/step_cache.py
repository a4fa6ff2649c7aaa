"""First-block cache for a DiT's repeated blocks: skip the rest of the blocks at steps where the first
block's output barely changed.

This is First Block Cache (ParaAttention's dynamic caching, diffusers' ``FirstBlockCacheConfig``),
with the same ``threshold``: at each call the first block runs; when the mean absolute change of its
residual (output minus input) against the last fully computed call, relative to that residual's mean
size, is below ``threshold``, the remaining blocks are skipped and their last residual is added to the
first block's output. A higher threshold skips more and drifts further from the uncached result.

Diffusers' own hooks need a block registry entry and a cache context that the Cosmos-Predict2
pipelines do not set; this module needs neither, so one implementation serves the Cosmos pipelines and
the ``aligned`` family's sampler. Guidance's conditional and unconditional calls keep separate states,
told apart by the ``encoder_hidden_states`` tensor each call gets (the same object at every step of one
draw). ``reset()`` starts a new draw; the image tools call it, report ``counts()`` and ``release()``
the kept tensors after the draw. With gradients enabled (training) every block runs.

The blocks stay where they were (``transformer.transformer_blocks``, the same modules under the same
state-dict keys), and a block compiled by ``compile_dit`` stays compiled: the decision runs in Python
between the blocks' calls, only while the transformer's forward runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch


@dataclass
class _Branch:
    residual: Any = None  # the first block's residual at the last fully computed call
    tail: Any = None  # what the remaining blocks added at that call
    head_out: Any = None
    skip: bool = False


@dataclass
class FirstBlockCache:
    """Attach with ``FirstBlockCache.attach(transformer, threshold)``."""

    threshold: float
    branches: dict[int, _Branch] = field(default_factory=dict)
    computed: int = 0
    skipped: int = 0
    _branch: _Branch | None = None
    _active: bool = False
    _hooks: list[Any] = field(default_factory=list)

    @classmethod
    def attach(cls, transformer: torch.nn.Module, threshold: float) -> FirstBlockCache:
        blocks = getattr(transformer, "transformer_blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) < 2:
            raise ValueError(
                f"first-block cache needs a DiT with at least 2 transformer_blocks; {type(transformer).__name__} "
                "has none or fewer"
            )
        if threshold <= 0:
            raise ValueError(f"first-block cache threshold must be > 0, not {threshold}")
        cache = cls(threshold)
        cached = _CachedBlocks(list(blocks))
        cached.cache = cache
        transformer.transformer_blocks = cached  # the same modules: the same state-dict keys
        cache._hooks = [
            transformer.register_forward_pre_hook(cache._enter, with_kwargs=True),
            transformer.register_forward_hook(cache._leave, always_call=True),
        ]
        transformer._first_block_cache = cache
        return cache

    @staticmethod
    def detach(transformer: torch.nn.Module) -> None:
        """Take the cache off ``transformer``: its blocks in a plain ``ModuleList`` again, no hooks."""
        cache = getattr(transformer, "_first_block_cache", None)
        if cache is None:
            return
        for hook in cache._hooks:
            hook.remove()
        transformer.transformer_blocks = torch.nn.ModuleList(list(transformer.transformer_blocks))
        del transformer._first_block_cache

    def reset(self) -> None:
        """Forget every state and count: the next call computes all blocks."""
        self.branches.clear()
        self.computed = self.skipped = 0

    def release(self) -> None:
        """Free the kept tensors (residuals of the hidden states: hundreds of MB for a video at
        704x1280), keeping the counts; the next call computes all blocks."""
        self.branches.clear()

    def counts(self) -> dict[str, int]:
        """Calls since ``reset`` that ran every block, and calls that ran the first block only."""
        return {"computed": self.computed, "skipped": self.skipped}

    def _enter(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self._branch = self.branches.setdefault(id(context), _Branch())
        self._active = not torch.is_grad_enabled()  # inference only: training runs every block

    def _leave(self, module: Any, args: Any, output: Any) -> None:
        self._active = False
        self._branch = None

    # ---- the three kinds of block call ----

    def head(self, block: Any, hidden: Any, *rest: Any) -> Any:
        out = block(hidden, *rest)
        residual = out - hidden
        b = self._branch
        assert b is not None
        if b.residual is not None and b.tail is not None and b.residual.shape == residual.shape:
            change = (residual - b.residual).abs().mean() / b.residual.abs().mean().clamp_min(1e-12)
            if float(change) < self.threshold:
                b.skip = True
                self.skipped += 1
                return out + b.tail
        b.skip, b.residual, b.head_out = False, residual, out
        self.computed += 1
        return out

    def middle(self, block: Any, hidden: Any, *rest: Any) -> Any:
        assert self._branch is not None
        return hidden if self._branch.skip else block(hidden, *rest)

    def last(self, block: Any, hidden: Any, *rest: Any) -> Any:
        b = self._branch
        assert b is not None
        if b.skip:
            return hidden
        out = block(hidden, *rest)
        b.tail, b.head_out = out - b.head_out, None
        return out


class _CachedBlocks(torch.nn.ModuleList):
    """A ``ModuleList`` of the same blocks whose iteration, while the transformer's forward runs,
    yields the blocks wrapped by the cache's head / middle / last calls."""

    cache: FirstBlockCache

    def __iter__(self) -> Any:
        blocks = list(super().__iter__())
        cache = self.__dict__.get("cache")
        if cache is None or not cache._active:
            return iter(blocks)
        n = len(blocks)
        return iter(
            partial(cache.head if i == 0 else cache.last if i == n - 1 else cache.middle, block)
            for i, block in enumerate(blocks)
        )
