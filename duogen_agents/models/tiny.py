"""Build the ``tiny`` preset's checkpoints: small random-weight models of the real classes.

Nothing is downloaded. Each checkpoint is built from a config, saved with ``save_pretrained`` into a
cache folder, and later loaded back through the same ``from_pretrained`` path a real checkpoint takes,
so the tiny preset exercises the real loading and generation code. Its words and pictures are noise.

The build is deterministic (fixed seeds, a tokenizer trained on a fixed corpus) and atomic: files are
written to a temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

# Bump when the tiny layout changes, so an old cache is rebuilt rather than misread.
TINY_VERSION = "2"  # 2: the tiny T5 tokenizer is built the same way every time

PLANNER_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Qwen2-VL style chat template: system prompt, turns, images as vision placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Fixed training text for the tiny tokenizers: plain English about the kind of answers we write, plus
# the JSON punctuation of planner actions, so merges produce word pieces rather than single bytes.
_CORPUS = [
    "How do I repot a plant? Water the plant a day before. Choose a pot one size larger.",
    "Loosen the roots gently, add fresh soil, set the plant at the same depth, and water well.",
    "Plan a small balcony garden with herbs, tomatoes, flowers and a watering schedule.",
    "Step one: gather the tools. Step two: prepare the soil. Step three: plant the seeds.",
    "Draw a kitchen with a wooden table, a blue pot, a window and green plants in the light.",
    "The character walks through the city at night; the street is wet and the lamps glow.",
    '{"type": "text", "text": "..."} {"type": "image", "prompt": "...", "references": [], '
    '"kind": "generate"} {"type": "done"} {"steps": [{"title": "...", "text": "..."}]}',
    "Sketch the layout first, look at the sketch, then answer with the final plan.",
    "verdict ok redraw continue edit generate draft image text steps title caption",
]


def _train_tokenizer(
    kind: Literal["byte_bpe", "unigram"], vocab_size: int, special: list[str], corpus: list[str] | None = None
) -> Any:
    if kind == "unigram":  # sentencepiece-style, as T5 uses
        return _unigram_tokenizer(vocab_size, special, corpus if corpus is not None else _CORPUS)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus if corpus is not None else _CORPUS * 4, trainer=trainer)
    return tok


def _unigram_tokenizer(vocab_size: int, special: list[str], corpus: list[str]) -> Any:
    """A sentencepiece-style tokenizer (Unigram model, Metaspace) built from ``corpus`` the same way
    every time: every character, then the substrings (up to 8 characters) of the words that cover
    the most text, each scored by the log of its frequency. The tokenizers library's UnigramTrainer
    picks different pieces from one run to the next (6 trainings of the same corpus gave 6
    vocabularies), so two builds of the tiny checkpoints tokenized a prompt differently and drew
    different pictures from the same seed."""
    import math
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words: Counter[str] = Counter("\u2581" + w for line in corpus for w in line.split())
    subs: Counter[str] = Counter()
    for word, count in words.items():
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + 8) + 1):
                subs[word[i:j]] += count
    pieces = sorted(p for p in subs if len(p) == 1)
    longer = sorted((p for p in subs if len(p) > 1), key=lambda p: (-subs[p] * len(p), p))
    pieces += longer[: max(0, vocab_size - len(special) - len(pieces))]
    total = sum(subs[p] for p in pieces)
    vocab = [(s, 0.0) for s in special] + [(p, math.log(subs[p] / total)) for p in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=special.index("<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(special)
    return tok


def planner_tokenizer_from(backend: Any, model_max_length: int = 32768) -> Any:
    """A Qwen-VL-style planner tokenizer (its special tokens and chat template) over ``backend``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )


def _planner_tokenizer() -> Any:
    return planner_tokenizer_from(_train_tokenizer("byte_bpe", 512, PLANNER_SPECIAL_TOKENS))


def _shapes_corpus() -> list[str]:
    """The shapes world's words (its prompts, step texts and image prompts, training split only) and
    the action protocol's keys, so a planner trained on the shapes world reads a cell, a colour or a
    shape as one token."""
    from duogen_agents.worlds.shapes import CELLS, COLORS, SHAPES, scene_prompt, tasks

    lines = list(_CORPUS)
    for task in tasks(400, split="train", seed=12345):
        lines += [t["prompt"] for t in task["turns"]]
        for scene in task["expect"].get("scenes", []):
            lines.append(scene_prompt({c: (o[0], o[1]) for c, o in scene.items()}))
        lines.append(" ".join(str(f) for f in task["expect"].get("facts", [])))
    lines.append(" ".join([*CELLS, *SHAPES, *COLORS, "Step 1: Step 2: Step 3: Step 4: yes no"]))
    return lines * 2


def _vocab_size(tokenizer: Any) -> int:
    return ((len(tokenizer) + 63) // 64) * 64


# The untrained planner the shapes runs start from (``tiny:shapes``, examples/shapes): the Qwen2.5-VL class,
# wider and deeper than ``tiny``'s, with a tokenizer trained on the shapes world's words.
SHAPES_PLANNER = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "vocab": 1024}


def build_tiny_planner(path: Path, family: Literal["qwen2_5_vl", "qwen3_vl", "shapes"] = "qwen2_5_vl") -> Path:
    """Write a random-weight planner checkpoint of the real Qwen-VL class to ``path`` (``shapes``: the
    Qwen2.5-VL class at ``SHAPES_PLANNER``'s size, with the shapes world's tokenizer)."""
    import torch
    from transformers import Qwen2VLImageProcessor

    torch.manual_seed(0)
    shapes = family == "shapes"
    if shapes:
        family = "qwen2_5_vl"
        backend = _train_tokenizer("byte_bpe", SHAPES_PLANNER["vocab"], PLANNER_SPECIAL_TOKENS, _shapes_corpus())
        tokenizer = planner_tokenizer_from(backend)
    else:
        tokenizer = _planner_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PLANNER_SPECIAL_TOKENS}
    special_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text = dict(
        vocab_size=_vocab_size(tokenizer),
        hidden_size=SHAPES_PLANNER["hidden_size"] if shapes else 64,
        intermediate_size=SHAPES_PLANNER["intermediate_size"] if shapes else 128,
        num_hidden_layers=SHAPES_PLANNER["num_hidden_layers"] if shapes else 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    # Small images: 4-pixel patches merged 2x2, at most 32x32 pixels -> at most 16 tokens per image.
    image_processor = Qwen2VLImageProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=32 * 32
    )
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary pairs per head
    mrope = [half // 4, (half - half // 4 + 1) // 2, (half - half // 4) // 2]  # [2, 3, 3] at 64 wide
    if family == "qwen2_5_vl":
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
            Qwen2VLVideoProcessor,
        )

        config = Qwen2_5_VLConfig(
            text_config={
                **text,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            },
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=16,
                out_hidden_size=text["hidden_size"],
                fullatt_block_indexes=[1],
            ),
            **special_ids,
        )
        model: Any = Qwen2_5_VLForConditionalGeneration(config)
        video_processor: Any = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
        processor: Any = Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=CHAT_TEMPLATE,
        )
    else:
        from transformers import (
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        config = Qwen3VLConfig(
            text_config={
                **text,
                "head_dim": 16,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e6,
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                },
            },
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=4,
                spatial_merge_size=2,
                temporal_patch_size=2,
                out_hidden_size=64,
                num_position_embeddings=64,
                deepstack_visual_indexes=[1],
            ),
            **special_ids,
        )
        model = Qwen3VLForConditionalGeneration(config)
        video_processor = Qwen3VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
        processor = Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=CHAT_TEMPLATE,
        )
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _tiny_text_encoder() -> tuple[Any, Any]:
    import torch
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    backend = _train_tokenizer("unigram", 300, ["<pad>", "</s>", "<unk>"])
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=_vocab_size(tokenizer),
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config), tokenizer


def _tiny_transformer(seed: int, in_channels: int) -> Any:
    import torch
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(seed)
    return CosmosTransformer3DModel(
        in_channels=in_channels,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(8, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True,
        extra_pos_embed_type="learnable",
    )


def build_tiny_image_pipelines(t2i_path: Path, v2w_path: Path) -> tuple[Path, Path]:
    """Write random-weight Cosmos-Predict2 Text2Image and Video2World pipelines (shared VAE/T5)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        Cosmos2TextToImagePipeline,
        Cosmos2VideoToWorldPipeline,
        FlowMatchEulerDiscreteScheduler,
    )

    from duogen_agents.models.images.safety import PassThroughSafetyChecker

    text_encoder, tokenizer = _tiny_text_encoder()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    for cls, seed, channels, path in (
        # Video2World takes one more input channel: the conditioning-frame mask.
        (Cosmos2TextToImagePipeline, 1, 16, t2i_path),
        (Cosmos2VideoToWorldPipeline, 2, 16 + 1, v2w_path),
    ):
        pipe = cls(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=_tiny_transformer(seed, channels),
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
            safety_checker=PassThroughSafetyChecker(),
        )
        # The safety checker is supplied at load time, never serialised with the weights.
        pipe.register_modules(safety_checker=None)
        pipe.save_pretrained(path)
    return t2i_path, v2w_path


def _atomic_build(target: Path, build: Any) -> Path:
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text(TINY_VERSION)
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / ".complete").exists():  # another process won the race
            return target
        raise
    return target


def ensure_tiny_planner(cache_dir: Path, family: str = "qwen2_5_vl") -> Path:
    """Build (once) and return the tiny planner checkpoint of ``family`` under ``cache_dir``."""
    return _atomic_build(
        cache_dir / f"tiny-v{TINY_VERSION}" / f"planner-{family}",
        lambda p: build_tiny_planner(p, family),  # type: ignore[arg-type]
    )


def ensure_tiny_image_pipelines(cache_dir: Path) -> dict[str, Path]:
    """Build (once) and return the tiny Text2Image and Video2World pipeline folders."""

    def _images(p: Path) -> None:
        build_tiny_image_pipelines(p / "text2image", p / "video2world")

    images = _atomic_build(cache_dir / f"tiny-v{TINY_VERSION}" / "image", _images)
    return {"text2image": images / "text2image", "video2world": images / "video2world"}


def ensure_tiny_checkpoints(cache_dir: Path, planner_family: str = "qwen2_5_vl") -> dict[str, Path]:
    """Build (once) and return the paths of the tiny planner and image pipelines under ``cache_dir``."""
    return {"planner": ensure_tiny_planner(cache_dir, planner_family), **ensure_tiny_image_pipelines(cache_dir)}


def build_tiny_flux2_klein(path: Path) -> Path:
    """Write a random-weight FLUX.2 [klein] pipeline (Qwen3 text encoder, Flux2 DiT, Flux2 VAE)."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _planner_tokenizer()
    torch.manual_seed(0)
    # 28 layers: the pipeline stacks the hidden states of layers 9, 18 and 27, as for the real 4B encoder.
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=_vocab_size(tokenizer),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(3)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    torch.manual_seed(4)
    vae = AutoencoderKLFlux2(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    pipe.save_pretrained(path)
    return path


def ensure_tiny_flux2_klein(cache_dir: Path) -> Path:
    """Build (once) and return the tiny FLUX.2 [klein] pipeline folder."""
    return _atomic_build(cache_dir / f"tiny-v{TINY_VERSION}" / "flux2-klein", build_tiny_flux2_klein)
