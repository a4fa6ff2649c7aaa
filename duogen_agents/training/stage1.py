"""Stage 1 of DuoGen: instruction-tune the planner on interleaved conversations.

Each example is one planner call of a correct answer (``data.planner_examples``): the conversation
the graph builds (text and earlier images, through the model's own chat template and processor,
exactly as at inference) followed by the action the planner should write and its end token. The loss
is on the action and the end token only. The vision tower stays frozen; the language model is trained
in full (small models) or through LoRA adapters (``lora_rank > 0``, peft; for real checkpoints).

The result is a checkpoint folder that loads through the same ``from_pretrained`` path as any
planner (LoRA adapters merged), and a preset file naming it: ``OUT/planner`` and ``OUT/preset.json``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duogen_agents.errors import ConfigError
from duogen_agents.training.data import load_tasks, planner_examples
from duogen_agents.training.loop import TrainConfig, check_out, path_input, run

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class Stage1Result:
    planner: Path
    preset: Path
    examples: int
    first_loss: float
    last_loss: float


def _resolve_base(base: str | Path) -> Any:
    from duogen_agents.presets import load_preset

    path = Path(base)
    if path.is_dir():
        for name in ("preset.json", "preset.toml"):
            if (path / name).is_file():
                return load_preset(path / name)
        raise ConfigError(f"--base {base}: a folder must hold the preset.json of an earlier `duogen train` run")
    return load_preset(base)


def local_base(base: str | Path) -> Any:
    """The preset of ``base`` (a name, a file or an earlier run's folder), refused when its planner is remote."""
    preset = _resolve_base(base)
    if preset.planner.backend != "transformers":
        raise ConfigError(
            f"--base {base}: its planner is remote ({preset.planner.describe()}); training needs local weights"
        )
    return preset


def load_planner(preset: Any, home: str | Path | None) -> Any:
    from duogen_agents.models.loading import quiet_libraries
    from duogen_agents.models.planner import TransformersPlanner
    from duogen_agents.storage.images import default_home

    root = Path(home) if home is not None else default_home()
    quiet_libraries()
    return TransformersPlanner.from_spec(preset.planner, preset.models_path(root))


def trainable_io(trained: list[tuple[str, Any]]) -> tuple[Any, Any]:
    """``save(ckpt)`` and ``load(ckpt)`` of the trained parameters, as ``ckpt/trainable.safetensors``."""
    import torch
    from safetensors.torch import load_file, save_file

    def save(ckpt: Path) -> None:
        save_file({n: p.detach().cpu().contiguous() for n, p in trained}, str(ckpt / "trainable.safetensors"))

    def load(ckpt: Path) -> None:
        state = load_file(str(ckpt / "trainable.safetensors"))
        with torch.no_grad():
            for n, p in trained:
                p.copy_(state[n].to(p.device, p.dtype))

    return save, load


def write_planner_run(out: Path, preset: Any, model: Any, planner: Any, suffix: str, how: str) -> tuple[Path, Path]:
    """``OUT/planner`` (a ``from_pretrained`` folder) and ``OUT/preset.json`` (``preset`` with that planner,
    named relative to the file, so the run folder can be moved or copied whole)."""
    final = out / "planner"
    model.save_pretrained(final)
    planner.processor.save_pretrained(final)
    spec = preset.model_dump(mode="json")
    spec["name"] = f"{preset.name}-{suffix}"
    spec["description"] = f"{preset.description} (planner {how})"
    spec["planner"]["model"] = f"./{final.name}"  # beside the preset file, wherever the run folder goes
    preset_path = out / "preset.json"
    preset_path.write_text(json.dumps(spec, indent=2))
    return final, preset_path


def first_and_last_loss(out: Path, last: dict[str, Any]) -> tuple[float, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows[0]["loss"], last.get("loss", rows[-1]["loss"])


def _end_token(planner: Any) -> int:
    """The token that ends an assistant turn in the chat template (``<|im_end|>`` for Qwen-VL)."""
    tok = planner.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return int(end) if isinstance(end, int) and end != tok.unk_token_id else int(tok.eos_token_id)


def _encode(planner: Any, conversation: Any, target: str) -> dict[str, Any]:
    """Input ids of conversation + target + end token, and labels on the target and end token only."""
    import torch

    enc = {k: v for k, v in planner.encode(conversation).items() if k != "image_digests"}
    tok = planner.tokenizer(target, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    answer = torch.tensor([*tok, _end_token(planner)], dtype=enc["input_ids"].dtype).unsqueeze(0)
    n = enc["input_ids"].shape[1]
    enc["input_ids"] = torch.cat([enc["input_ids"], answer], dim=1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    if "mm_token_type_ids" in enc:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    labels = enc["input_ids"].clone()
    labels[:, :n] = -100
    enc["labels"] = labels
    return enc


def train_stage1(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    lora_rank: int = 0,
    resume: bool = False,
    home: str | Path | None = None,
) -> Stage1Result:
    """Fine-tune ``base``'s planner (a preset name or file, or an earlier run's folder) on ``data``."""
    import torch

    cfg = cfg or TrainConfig()
    cfg.check()
    out = Path(out)
    preset = local_base(base)
    check_out(out, resume, [out])
    tasks = load_tasks(data)  # a bad file fails here, before any model loads
    with tempfile.TemporaryDirectory(prefix="duogen-teacher-") as tmp:
        examples = planner_examples(tasks, preset, Path(tmp))
    planner = load_planner(preset, home)
    model = planner.model
    if str(planner.device) != "cpu" and model.dtype == torch.float16:
        raise ConfigError("train in bfloat16 or float32 (set planner.dtype), not float16")
    encoded = [_encode(planner, ex.conversation, ex.target) for ex in examples]

    for p in model.parameters():
        p.requires_grad_(False)
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.seed)  # the adapters' initial weights follow --seed
        with warnings.catch_warnings():  # peft asks transformers 5 for a property it renamed (not ours to fix)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(
                model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
            )
    else:
        for name, p in model.named_parameters():
            if ".visual." not in f".{name}":
                p.requires_grad_(True)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trained]
    model.train()

    def loss_of(i: int) -> Any:
        batch = {k: v.to(planner.device) for k, v in encoded[i].items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        return model(**batch, use_cache=False).loss

    save, load = trainable_io(trained)
    last = run(
        out, cfg, len(encoded), params, loss_of, save, load, resume=resume, label="stage 1",
        extra={"base": path_input(base), "data": str(Path(data).resolve()), "examples": len(encoded),
               "lora_rank": lora_rank},
    )  # fmt: skip

    model.eval()
    if lora_rank > 0:
        model = model.merge_and_unload()
    final, preset_path = write_planner_run(out, preset, model, planner, "stage1", "fine-tuned by duogen train stage1")
    return Stage1Result(final, preset_path, len(encoded), *first_and_last_loss(out, last))
