"""Overhead of our nodes against the raw libraries, measured in the same run.

    python benchmarks/overhead.py                 # tiny preset, CPU
    python benchmarks/overhead.py --real-shapes   # random weights at real shapes (GPU): 7B-class
                                                  # Qwen2.5-VL planner, 2B Cosmos-Predict2 DiTs, T5-XXL encoder

Rows:
- planner: ``PlannerChatModel.invoke`` (what the plan node calls: message conversion, image loading
  from the store, grammar-constrained decoding, token streaming) against plain ``model.generate`` on
  the same input for the same number of new tokens, without a grammar.
- render: ``Renderer.render`` (what the render node calls: reference loading, the draw, PNG encoding,
  sha256, atomic store write) against the plain diffusers pipeline call with the same arguments,
  for Text2Image and for Video2World with one reference (diffusers' own pipeline class: ours encodes
  only the conditioning frames).
- ``duogen run`` end to end (tiny only): the wall time of the command, model loading included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _home import scratch_home  # noqa: E402

from duogen_agents.graphs import actions as A  # noqa: E402
from duogen_agents.models.chat_model import PlannerChatModel  # noqa: E402
from duogen_agents.models.images.cosmos2 import CosmosImageTool, PassThroughSafetyChecker, conditioning_frames  # noqa: E402
from duogen_agents.models.loading import quiet_libraries  # noqa: E402
from duogen_agents.models.planner import TransformersPlanner  # noqa: E402
from duogen_agents.presets import load_preset  # noqa: E402
from duogen_agents.storage.images import ImageStore  # noqa: E402
from duogen_agents.tools.render import Renderer  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


# The real models' shapes (random weights): Qwen2.5-VL-7B-Instruct, T5-XXL's encoder, the Wan VAE and
# the Cosmos-Predict2-2B DiTs. ``shrink``: one layer per stack, to dry-run a path on a CPU.


def qwen25_vl_7b_config(ids: dict[str, int], shrink: bool = False) -> Any:
    """``ids``: the special tokens' ids in the tokenizer used with it."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=1 if shrink else 28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1 if shrink else 32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=3584,
            fullatt_block_indexes=[0] if shrink else [7, 15, 23, 31],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def t5_xxl_encoder(dtype: Any, shrink: bool = False) -> Any:
    """Built on the current default device (``with torch.device(...)``)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=1024,
        d_ff=1024 if shrink else 65536,
        d_kv=128,
        num_heads=128,
        num_layers=1 if shrink else 24,
        feed_forward_proj="relu",
    )
    return T5EncoderModel(config).to(dtype).eval()


def wan_vae(dtype: Any) -> Any:
    """Built on the current default device."""
    from diffusers import AutoencoderKLWan

    return (
        AutoencoderKLWan(
            base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
        )
        .to(dtype)
        .eval()
    )


def cosmos_dit(dtype: Any, video2world: bool, layers: int = 28) -> Any:
    """Built on the current default device. ``layers``: the 2B model's 28 blocks, or fewer."""
    from diffusers import CosmosTransformer3DModel

    return (
        CosmosTransformer3DModel(
            in_channels=17 if video2world else 16,
            rope_scale=(1.0, 3.0, 3.0) if video2world else (1.0, 4.0, 4.0),
            out_channels=16,
            num_attention_heads=16,
            attention_head_dim=128,
            num_layers=layers,
            mlp_ratio=4.0,
            text_embed_dim=1024,
            adaln_lora_dim=256,
            max_size=(128, 240, 240),
            patch_size=(1, 2, 2),
            concat_padding_mask=True,
            extra_pos_embed_type=None,
        )
        .to(dtype)
        .eval()
    )


def cosmos_pipeline_modules(text_encoder: Any, tokenizer: Any, transformer: Any, vae: Any, checker: Any) -> dict:
    """The keyword arguments of a Cosmos-Predict2 pipeline, with a fresh scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=checker,
    )


def cosmos_dit_inputs(latent_frames: int, height: int, width: int, video2world: bool, dtype: Any) -> dict:
    """One DiT call's inputs as the Cosmos pipelines pass them (512 T5 states), on the meta device."""

    def meta(*shape: int) -> Any:
        return torch.empty(shape, device="meta", dtype=dtype)

    lh, lw = height // 8, width // 8
    extra = {"condition_mask": meta(1, 1, latent_frames, lh, lw), "fps": 16} if video2world else {}
    return dict(
        hidden_states=meta(1, 16, latent_frames, lh, lw),
        timestep=meta(1, 1, latent_frames, 1, 1) if video2world else meta(1),
        encoder_hidden_states=meta(1, 512, 1024),
        padding_mask=meta(1, 1, height, width),
        **extra,
    )


def real_shape_components(home: Path, tokenizer: Any = None) -> tuple[TransformersPlanner, CosmosImageTool, Any]:
    """Random weights at real shapes, built in memory on the GPU (nothing is downloaded)."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from duogen_agents.models.tiny import CHAT_TEMPLATE, _planner_tokenizer

    preset = load_preset("qwen2.5-vl-7b+cosmos2-2b")
    preset.image.steps = int(os.environ.get("BENCH_STEPS", "20"))
    preset.image.safety_checker = "none"
    # Eager first, guidance unbatched; benchmarks/visual_plan.py measures the compiled switches as a
    # variant, benchmarks/cfg_batch.py guidance in one batch.
    preset.planner.compile = preset.image.compile = preset.image.cfg_batch = False
    dev, dt = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    # BENCH_SHRINK=1: one layer per stack and a small picture, to dry-run this path on a CPU.
    shrink = os.environ.get("BENCH_SHRINK") == "1"
    if shrink:
        preset.image.height, preset.image.width, preset.image.steps = 64, 112, 2
        preset.planner.max_text_chars, preset.planner.max_prompt_chars = 32, 16
    else:  # bound a random model's output so the planner row measures ~300 tokens, not 800+
        preset.planner.max_text_chars, preset.planner.max_prompt_chars = 200, 80
    tok = tokenizer if tokenizer is not None else _planner_tokenizer()
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|endoftext|>")
    }
    with torch.device(dev):
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen25_vl_7b_config(ids, shrink), dtype=dt).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(max_pixels=preset.planner.max_pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    planner = TransformersPlanner(model, processor, preset.planner, "random 7B-class")

    return planner, real_shape_image_tool(preset), preset


def real_shape_image_tool(preset: Any) -> CosmosImageTool:
    """The Cosmos-Predict2 2B image tool at real shapes, random weights, built in memory on the GPU
    (``BENCH_SHRINK=1``: two blocks per DiT, to dry-run on a CPU)."""
    from diffusers import Cosmos2TextToImagePipeline

    from duogen_agents.models.tiny import _tiny_text_encoder

    dev, dt = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    shrink = os.environ.get("BENCH_SHRINK") == "1"
    _, t5_tok = _tiny_text_encoder()
    layers = 2 if shrink else 28  # the first-block cache needs a first and a last block
    with torch.device(dev):
        t5, vae = t5_xxl_encoder(dt, shrink), wan_vae(dt)
        t2i_dit, v2w_dit = cosmos_dit(dt, False, layers), cosmos_dit(dt, True, layers)
    checker = PassThroughSafetyChecker().to(dev)
    t2i = Cosmos2TextToImagePipeline(**cosmos_pipeline_modules(t5, t5_tok, t2i_dit, vae, checker))
    t2i.set_progress_bar_config(disable=True)
    tool = CosmosImageTool(t2i, preset.image, "", checker)
    from duogen_agents.models.images.video2world import ConditioningVideo2World

    # as CosmosImageTool.video2world loads it
    v2w = ConditioningVideo2World(**cosmos_pipeline_modules(t5, t5_tok, v2w_dit, vae, checker))
    v2w.set_progress_bar_config(disable=True)
    tool._video2world = v2w
    return tool


def plain_inputs(planner: TransformersPlanner, conversation: Any) -> dict[str, Any]:
    """``generate``'s inputs for ``conversation``, every picture processed afresh, on the planner's device."""
    enc = {
        k: v.to(planner.device) for k, v in planner.encode(conversation, reuse=False).items() if k != "image_digests"
    }
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(planner.model.dtype)
    return enc


_PLAIN: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def plain_video2world(tool: CosmosImageTool) -> Any:
    """Diffusers' own Video2World pipeline over the tool's modules, for baselines: the tool's pipeline
    encodes only the conditioning frames, diffusers' the whole padded clip."""
    from diffusers import Cosmos2VideoToWorldPipeline

    ours = tool.video2world
    if ours not in _PLAIN:
        _PLAIN[ours] = plain = Cosmos2VideoToWorldPipeline(**ours.components)
        plain.set_progress_bar_config(disable=True)
    return _PLAIN[ours]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real-shapes", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each row (at least 1)")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    quiet_libraries()
    home = scratch_home("duogen-bench-")
    store = ImageStore(home)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.real_shapes:
        planner, tool, preset = real_shape_components(home)
    else:
        preset = load_preset("tiny")
        planner = TransformersPlanner.from_spec(preset.planner, home / "models")
        tool = CosmosImageTool.from_spec(preset.image, home / "models")
    print(
        f"device: {device}; preset: {'real shapes, random weights' if args.real_shapes else 'tiny'}; "
        f"image {preset.image.width}x{preset.image.height}, {preset.image.steps} steps"
    )
    rows: list[tuple[str, float, float]] = []

    # ---- planner -----------------------------------------------------------------------------
    from langchain_core.messages import HumanMessage, SystemMessage

    photo = store.put(Image.new("RGB", (640, 480), (120, 160, 90)))
    messages = [
        SystemMessage(content="You make visual plans."),
        HumanMessage(
            content=[{"type": "image", "file_id": photo.id}, {"type": "text", "text": "How do I repot a plant?"}]
        ),
    ]
    chat = PlannerChatModel(planner=planner, store=store)
    schema = A.step_schema(
        [photo.short], max_text=preset.planner.max_text_chars, max_prompt=preset.planner.max_prompt_chars, max_refs=4
    )
    ours_t, resp = timed(lambda: chat.invoke(messages, schema=schema, seed=0), args.repeats)
    n_new = int(resp.usage_metadata["output_tokens"])
    from duogen_agents.models.chat_model import to_chat_turns

    enc = plain_inputs(planner, to_chat_turns(messages, store.open))

    def plain_generate() -> Any:
        with torch.inference_mode():
            return planner.model.generate(
                **enc,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=planner.stop_token_ids[0],
            )

    plain_t, _ = timed(plain_generate, args.repeats)
    rows.append((f"planner call, {n_new} new tokens", ours_t, plain_t))

    # ---- render ------------------------------------------------------------------------------
    renderer = Renderer(tool, store)
    ours_t, ref = timed(lambda: renderer.render("a terracotta pot on a table", seed=0), args.repeats)
    kw = tool._common("a terracotta pot on a table", 0, None)
    kw.pop("callback_on_step_end")

    def plain_t2i() -> Any:
        kw["generator"] = torch.Generator("cpu").manual_seed(0)
        return tool.text2image(**kw).images[0]

    plain_t, _ = timed(plain_t2i, args.repeats)
    rows.append(("render, text2image", ours_t, plain_t))

    ref = ref.ref
    ours_t, _ = timed(lambda: renderer.render("the pot, a moment later", [ref], kind="continue", seed=0), args.repeats)
    pipe = plain_video2world(tool)
    frames, n_frames, index = conditioning_frames(
        [store.open(ref)], preset.image.horizon_frames, pipe.vae_scale_factor_temporal
    )

    def plain_v2w() -> Any:
        kw["generator"] = torch.Generator("cpu").manual_seed(0)
        return pipe(video=frames, num_frames=n_frames, fps=preset.image.fps, **kw).frames[0][index]

    plain_t, _ = timed(plain_v2w, args.repeats)
    rows.append(("render, video2world continue (1 reference)", ours_t, plain_t))

    print(f"\n{'what':44} {'ours (s)':>10} {'baseline (s)':>13} {'ratio':>7}")
    for name, ours, base in rows:
        print(f"{name:44} {ours:10.3f} {base:13.3f} {ours / base:7.2f}")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    if not args.real_shapes and not args.skip_e2e:
        with tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "DUOGEN_HOME": str(home)}
            cmd = [
                "duogen",
                "run",
                "How do I repot a plant?",
                "--mode",
                "visual-plan",
                "--preset",
                "tiny",
                "--out",
                out,
            ]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            print(
                f"\nduogen run --mode visual-plan --preset tiny (end to end, models cached): {time.perf_counter() - t:.2f} s"
            )


if __name__ == "__main__":
    main()
