"""Language-model pretraining of a planner on plain text, before stage 1 (``duogen train pretrain``).

A planner trained from random weights has no language yet: stage 1's loss covers only the few tokens
of each action, and a small model learns the action's format from it long before it learns to copy the
objects and cells of the request into its image prompts. Real checkpoints arrive pretrained; this
gives a from-scratch planner (``tiny:shapes``) the same start: next-token prediction over every token
of plain-text documents (e.g. ``duogen_agents.worlds.shapes.write_corpus``), batched with padding.
The vision tower is not used and stays as it was.

The text file holds one JSON object per line with a ``text`` field (the convention of Hugging Face
text datasets). The result has the layout of a stage-1 run, ``OUT/planner`` and ``OUT/preset.json``,
so ``duogen train stage1 --base OUT`` continues from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duogen_agents.errors import ConfigError
from duogen_agents.training.data import DataError
from duogen_agents.training.loop import TrainConfig, check_out, path_input, run


@dataclass
class PretrainResult:
    planner: Path
    preset: Path
    documents: int
    tokens: int
    first_loss: float
    last_loss: float


def load_texts(path: str | Path) -> list[str]:
    """The documents of a JSONL file of ``{"text": ...}``; a line that is not one fails with its number."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a folder; give the JSON lines file of its documents")
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    texts = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f'{p}: not UTF-8 text; a text file is JSON lines of {{"text": ...}}') from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f'{p}:{n}: each line must be an object with a non-empty "text" string')
        texts.append(row["text"])
    if not texts:
        raise DataError(f"{p}: no documents")
    return texts


def train_pretrain(
    base: str | Path,
    text: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    *,
    max_tokens: int = 512,
    resume: bool = False,
    home: str | Path | None = None,
) -> PretrainResult:
    """Train ``base``'s planner language model on the documents of ``text`` (full-sequence loss)."""
    import torch

    from duogen_agents.training.stage1 import (
        _end_token,
        first_and_last_loss,
        load_planner,
        local_base,
        trainable_io,
        write_planner_run,
    )

    cfg = cfg or TrainConfig()
    cfg.check()
    if max_tokens < 8:
        raise ConfigError("--max-tokens must be at least 8")
    out = Path(out)
    preset = local_base(base)
    check_out(out, resume, [out])
    texts = load_texts(text)  # a bad file fails here, before any model loads
    planner = load_planner(preset, home)
    model, tok = planner.model, planner.tokenizer
    end = _end_token(planner)
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    docs = []
    for t in texts:  # the end token closes a whole document; a cut one just stops
        ids = tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        docs.append(ids[:max_tokens] if len(ids) >= max_tokens else [*ids, end])

    for name, p in model.named_parameters():
        p.requires_grad_(".visual." not in f".{name}")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trained]
    model.train()

    def loss_of(batch: list[int]) -> Any:
        width = max(len(docs[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(docs[i])] = torch.tensor(docs[i])
            mask[row, : len(docs[i])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        dev = planner.device
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev), use_cache=False).loss

    save, load = trainable_io(trained)
    last = run(
        out, cfg, len(docs), params, loss_of, save, load, resume=resume, label="pretrain", batched=True,
        extra={"base": path_input(base), "text": str(Path(text).resolve()), "documents": len(docs),
               "max_tokens": max_tokens},
    )  # fmt: skip

    model.eval()
    final, preset_path = write_planner_run(
        out, preset, model, planner, "pretrained", "pretrained by duogen train pretrain"
    )
    return PretrainResult(final, preset_path, len(docs), sum(map(len, docs)), *first_and_last_loss(out, last))
