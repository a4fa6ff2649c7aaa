"""GPU memory of the 24 GB preset (``qwen2.5-vl-7b+cosmos2-2b-24gb``: one role on the GPU at a time, the
planner, or an image pipeline's T5 encoder, DiT and VAE), estimated on a CPU without computing anything.

The models are built at their real shapes (random weights, ``overhead.py``) on PyTorch's meta device,
which works out shapes and no values, and a dispatch mode adds up the bytes of the tensors made during a
call and alive at each moment (its inputs, made in the call, included; views of what existed before it
not): the peak of a call is the most it held. Attention is counted as the
GPU's fused kernels run it (flash or memory-efficient: the output and a float32 log-sum-exp, no score
matrix). A phase's peak is the weights then on the GPU (the offload arena, the size of the largest
role), the planner's KV caches (they stay on the GPU;
the prefill's own is part of its call), and the largest call of the phase. Not counted: the CUDA context, cuBLAS and cuDNN
workspaces, the caching allocator's rounding and fragmentation, and the vision tower's activations (a
picture at the 7B preset's max_pixels is about 2,000 patches of width 1,280: megabytes). One row repeats
the settings of the H200 run whose peak was measured (README "Speed and memory"), to show how far the
estimate falls from a measurement. Run the calls under ``torch.inference_mode`` (as the planner and the
pipelines run): under ``no_grad`` composite ops decompose into views of the weights.

    python benchmarks/memory_estimate.py            # about a minute on this CPU (tiled decodes: longer)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import cosmos_dit, cosmos_dit_inputs, qwen25_vl_7b_config, t5_xxl_encoder, wan_vae  # noqa: E402

from duogen_agents.models.images.cosmos2 import conditioning_frames  # noqa: E402
from duogen_agents.models.loading import quiet_libraries  # noqa: E402

GIB = 2**30
BF16 = torch.bfloat16
TEMPORAL, SPATIAL = 4, 8  # the Wan VAE: four frames to one latent frame (after the first), 8x8 pixels to one


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storages made inside the mode and still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output sharing an argument's storage (a view, an in-place result) allocated nothing.
        given = {id(a.untyped_storage()) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._sizes and key not in given:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key)
        return out


def _fused_attention(*args: Any, **kwargs: Any) -> Any:
    """What a fused attention kernel allocates: its output and a float32 log-sum-exp per query row."""
    q, _k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args) :]])[:3]
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    del lse
    *batch, heads, rows, _ = q.shape  # the kernels' layout: (batch, rows, heads, dim), returned transposed
    return q.new_empty(*batch, rows, heads, v.shape[-1]).transpose(-3, -2)


@contextlib.contextmanager
def fused_attention() -> Any:
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def peak_of(fn: Any) -> float:
    """GiB held at most during ``fn()`` by tensors it made (its result included)."""
    mode = LiveBytes()
    with torch.inference_mode(), fused_attention(), mode:
        result = fn()
    del result
    return mode.peak / GIB


def weights(module: Any) -> float:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())) / GIB


def meta(shape: tuple[int, ...], dtype: Any = BF16) -> Any:
    return torch.empty(shape, device="meta", dtype=dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=704)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--prompt-tokens", type=int, default=2623, help="the planner's longest prompt (H200 run: 2,623)")
    ap.add_argument("--static-cache-tokens", type=int, default=16384, help="planner.static_cache_tokens")
    ap.add_argument("--sessions", type=int, default=1, help="sessions whose KV caches the planner keeps (up to 4)")
    args = ap.parse_args()
    quiet_libraries()
    from transformers import Qwen2_5_VLForConditionalGeneration

    from duogen_agents.models.tiny import _planner_tokenizer

    tok = _planner_tokenizer()
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")
    }
    with torch.device("meta"):
        planner = Qwen2_5_VLForConditionalGeneration._from_config(qwen25_vl_7b_config(ids), dtype=BF16).eval()
        t5, vae = t5_xxl_encoder(BF16), wan_vae(BF16)
        t2i, v2w = cosmos_dit(BF16, video2world=False), cosmos_dit(BF16, video2world=True)
    w = {"planner": weights(planner), "t5": weights(t5), "vae": weights(vae), "t2i": weights(t2i), "v2w": weights(v2w)}
    text = planner.config.get_text_config()
    kv_per_token = (
        2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    )
    kv = args.sessions * args.prompt_tokens * kv_per_token * 2 / GIB  # bf16
    h, wd = args.height, args.width
    lh, lw = h // SPATIAL, wd // SPATIAL

    def prefill() -> Any:
        from transformers import DynamicCache

        n = args.prompt_tokens
        positions = torch.arange(n, device="meta").view(1, 1, n).expand(4, 1, n)
        return planner(
            input_ids=meta((1, n), torch.long),
            position_ids=positions,
            past_key_values=DynamicCache(config=text),
            use_cache=True,
            logits_to_keep=1,
        )

    def encode_text() -> Any:
        return t5(input_ids=meta((1, 512), torch.long)).last_hidden_state  # a mask would be read (.all())

    def dit_call(model: Any, latent_frames: int, video2world: bool) -> Any:
        return model(**cosmos_dit_inputs(latent_frames, h, wd, video2world, BF16)).sample

    def decode(latent_frames: int, tiled: bool) -> Any:
        vae.enable_tiling() if tiled else vae.disable_tiling()
        return vae.decode(meta((1, 16, latent_frames, lh, lw))).sample

    def encode(frames: int, tiled: bool) -> Any:
        vae.enable_tiling() if tiled else vae.disable_tiling()
        return vae.encode(meta((1, 3, frames, h, wd))).latent_dist.mean

    print(
        f"Estimated GPU memory, GiB, at {wd}x{h}, bf16; the planner's KV cache for {args.sessions} session(s) of "
        f"{args.prompt_tokens} tokens: {kv:.2f}"
    )
    print(
        f"weights: planner {w['planner']:.2f}, T5-XXL encoder {w['t5']:.2f}, Text2Image DiT {w['t2i']:.2f}, "
        f"Video2World DiT {w['v2w']:.2f}, VAE {w['vae']:.2f}"
    )
    # The roles take turns in one arena the size of the largest (models/residency.py), so every phase
    # holds that much; the H200 run's offloading, measured before the arena, held each role's own size.
    arena = max(w["planner"], w["t5"] + w["t2i"] + w["vae"], w["t5"] + w["v2w"] + w["vae"])
    text_peak = peak_of(encode_text)
    # (what, weights on the GPU, KV caches beside the call, largest call, its name). The prefill's call
    # holds its own session's cache; the other sessions' caches are beside it.
    rows: list[tuple[str, float, float, float, str]] = [
        (
            f"planner prefill, {args.prompt_tokens} tokens",
            arena,
            kv * (args.sessions - 1) / args.sessions,
            peak_of(prefill),
            "prefill",
        )
    ]

    def draw(label: str, refs: int, ahead: int, tiled: bool, ours: bool, in_arena: bool = True) -> float:
        """Adds the draw's row; returns its largest call."""
        if refs == 0:
            calls = {
                "T5": text_peak,
                "DiT": peak_of(lambda: dit_call(t2i, 1, False)),
                "VAE decode": peak_of(lambda: decode(1, tiled)),
            }
            on_gpu = w["t5"] + w["t2i"] + w["vae"]
        else:
            frames, clip, _ = conditioning_frames([None] * refs, ahead, TEMPORAL)
            latent = (clip - 1) // TEMPORAL + 1
            calls = {
                "T5": text_peak,
                "VAE encode": peak_of(lambda: encode(len(frames) if ours else clip, tiled)),
                "DiT": peak_of(lambda: dit_call(v2w, latent, True)),
                "VAE decode": peak_of(lambda: decode(latent, tiled)),
            }
            on_gpu = w["t5"] + w["v2w"] + w["vae"]
        name = max(calls, key=calls.__getitem__)
        rows.append((label, arena if in_arena else on_gpu, kv, calls[name], name))
        print(f"  {label}: " + ", ".join(f"{k} {v:.2f}" for k, v in calls.items()), flush=True)
        return calls[name]

    print("largest calls of each draw:")
    draw("text-to-image, VAE whole", 0, 0, False, True)
    draw("text-to-image, VAE in tiles", 0, 0, True, True)
    measured = draw(
        "video2world, 1 earlier, 3 ahead, VAE whole, diffusers' encode, no arena (the H200 run)",
        1,
        3,
        False,
        False,
        False,
    )
    draw("video2world, 1 earlier, 28 ahead, VAE in tiles (the preset as shipped)", 1, 28, True, True)
    draw("video2world, 5 earlier, 28 ahead, VAE in tiles (the preset as shipped)", 5, 28, True, True)
    print(f"\n{'phase':84s} {'weights':>8s} {'KV':>5s} {'largest call':>18s} {'total':>6s}")
    for label, on_gpu, beside, call, name in rows:
        print(f"{label:84s} {on_gpu:8.2f} {beside:5.2f} {call:8.2f} {name:>9s} {on_gpu + beside + call:6.2f}")
    static = args.static_cache_tokens * kv_per_token * 2 / GIB
    print(
        f"planner.compile adds its static KV cache of {args.static_cache_tokens} tokens, {static:.2f}, beside every "
        f"phase (in place of the prefill's own cache), and the CUDA graphs' memory pool (not counted); arena "
        f"{arena:.2f} (the largest role)"
    )
    resident = sum(w.values())
    print(
        f"every model resident (no offload): weights {resident:.2f}; with the H200 run's largest call "
        f"{resident + kv + measured:.2f}"
    )


if __name__ == "__main__":
    main()
