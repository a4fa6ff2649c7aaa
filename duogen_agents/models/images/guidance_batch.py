"""Classifier-free guidance in one batch: the DiT's conditional and unconditional calls of a step run
as one call on a batch of two (``image.cfg_batch``).

The Cosmos-Predict2 pipelines call the DiT twice per step, once with the prompt's T5 states and once
with the negative prompt's, on the same latents, timestep and masks (Text2Image passes the same
tensors; Video2World builds equal ones for the second call). For the length of one pipeline call,
``one_batch(pipe)`` puts a stand-in for the DiT on the pipeline: it learns the two prompts' states from
the pipeline's own ``encode_prompt``; at the conditional call it runs both halves together (the inputs
stacked, the two prompts' states as one batch) and returns the first half; at the unconditional call,
when every input equals the first call's, it returns the kept second half without running the DiT.
Anything else (another argument layout, a callback that changed the states, inputs that differ, a
batch of two that runs out of GPU memory: then batching stops for the rest of the draw) runs the DiT as
the pipeline asked, so the result is always the pipeline's; ``counts()`` says how many steps were
paired, how many DiT calls ran unpaired, and how many batched halves went unused.

Same result up to the rounding of a batched matmul, for the memory of a second set of activations. Whether
it is faster depends on the card and size: a DiT that already fills the GPU gains little (the issue's
H200 measurement: four pictures batched took 5.1 times one). The pipeline's safety checks still see
the prompt text: nothing in the call changes but the DiT's.

With a First Block Cache (``step_cache``) the paired call is one branch: its decision to skip covers
both halves together, where unpaired calls decide each prompt's branch on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# The DiT's arguments that carry the batch in their first dimension; the rest (padding_mask, which
# the DiT repeats over the batch itself; fps) are passed as they are.
_STACKED = ("hidden_states", "timestep", "condition_mask")


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


class _PairedDiT:
    """Stands in for the pipeline's DiT during one call (module doc); every attribute but the call is
    the real DiT's."""

    def __init__(self, transformer: Any) -> None:
        self._dit = transformer
        self._cond: Any = None
        self._uncond: Any = None
        self._both: Any = None  # the two prompts' states as one batch, built once per call
        self._kept: tuple[dict[str, Any], Any] | None = None  # the conditional call's inputs, the second half
        self.paired = 0  # steps whose two calls ran as one batch
        self.unpaired = 0  # DiT calls run as the pipeline asked
        self.wasted = 0  # batched calls whose second half went unused (the other call's inputs differed)
        self.batching = True  # off for the rest of the draw once a batch ran out of memory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dit, name)

    def arm(self, cond: Any, uncond: Any) -> None:
        if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor) and cond.shape == uncond.shape:
            self._cond, self._uncond = cond, uncond
            self._both = torch.cat([cond, uncond])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("encoder_hidden_states")
        plain = args or kwargs.get("return_dict", True) or self._cond is None or not self.batching
        if not plain and context is self._cond:
            if self._kept is not None:
                self.wasted += 1  # the last batch's second half was never asked for
            self._kept = None
            out = self._both_halves(kwargs)
            if out is not None:
                return out
        elif not plain and context is self._uncond and self._kept is not None:
            inputs, second = self._kept
            self._kept = None
            if inputs.keys() == kwargs.keys() and all(
                _same(v, inputs[k]) for k, v in kwargs.items() if k != "encoder_hidden_states"
            ):
                self.paired += 1
                return (second,)
            self.wasted += 1
        self.unpaired += 1
        return self._dit(*args, **kwargs)

    def _both_halves(self, kwargs: dict[str, Any]) -> Any:
        """Both halves in one call, the first returned and the second kept; None where this call
        cannot be batched (an argument layout this does not know, or no memory for a batch of two:
        then no later step tries, and the pipeline's own calls run)."""
        hidden = kwargs.get("hidden_states")
        batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) else None
        stacked = dict(kwargs, encoder_hidden_states=self._both)
        for k in _STACKED:
            v = kwargs.get(k)
            if v is None:
                continue
            if not (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch):
                return None
            stacked[k] = torch.cat([v, v])
        try:
            out = self._dit(**stacked)[0]
        except torch.OutOfMemoryError:
            del stacked
            self.batching = False
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        first, second = out.chunk(2)
        self._kept = (dict(kwargs), second)
        return (first,)


@contextmanager
def one_batch(pipe: Any) -> Iterator[_PairedDiT]:
    """For one call of ``pipe`` (a Cosmos-Predict2 pipeline with guidance): its DiT's two calls per
    step run as one batch (module doc). Yields the stand-in, whose ``paired`` and ``unpaired`` count
    the steps."""
    dit = pipe.transformer
    paired = _PairedDiT(dit)
    encode = pipe.encode_prompt

    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        cond, uncond = encode(*args, **kwargs)
        paired.arm(cond, uncond)
        return cond, uncond

    # Swapped in the instance's __dict__ for this call only (register_modules would rewrite the
    # pipeline's config); a draw holds the device's turn lock, so nothing else uses the pipeline.
    pipe.__dict__["transformer"] = paired
    pipe.__dict__["encode_prompt"] = encode_prompt
    try:
        yield paired
    finally:
        pipe.__dict__["transformer"] = dit
        del pipe.__dict__["encode_prompt"]
        if paired._kept is not None:
            paired.wasted += 1
        paired._kept = paired._both = paired._cond = paired._uncond = None


def counts(paired: _PairedDiT) -> dict[str, Any]:
    """For a drawing's details: steps paired, DiT calls run unpaired, batched halves wasted, and
    whether batching stopped for want of memory."""
    out = {"paired": paired.paired, "unpaired": paired.unpaired, "wasted": paired.wasted}
    if not paired.batching:
        out["out_of_memory"] = True
    return {"cfg_batch": out}
