"""A byte-level BPE tokenizer with Qwen's vocabulary size (151,643 tokens + specials), built locally.

No hub: the first merges are learned from the tiny preset's small English corpus (so common words
take few tokens); the rest are made up, each new token joining two existing ones, mostly letters
with and without a leading space (``Ġ``), as word pieces of a natural-language vocabulary are. It tokenizes any text (every byte is a token), and xgrammar sees a vocabulary of the
real size, which is what grammar-mask cost depends on.
"""

from __future__ import annotations

import json
import random
from typing import Any

QWEN_REGULAR_TOKENS = 151_643


def _learned_json() -> str:
    from duogen_agents.models.tiny import _train_tokenizer

    return json.dumps(json.loads(_train_tokenizer("byte_bpe", 4096, []).to_str())["model"])


def real_size_tokenizer(size: int = QWEN_REGULAR_TOKENS, seed: int = 0) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from duogen_agents.models.tiny import PLANNER_SPECIAL_TOKENS, planner_tokenizer_from

    rng = random.Random(seed)
    learned = json.loads(_learned_json())
    vocab: dict[str, int] = dict(learned["vocab"])
    merges: list[tuple[str, str]] = [
        tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]
    ]
    letters = [ch for ch in vocab if len(ch) == 1 and ch.isascii() and ch.isalpha()]
    pieces = [t for t in vocab if t.isalpha() or (t.startswith("Ġ") and t[1:].isalpha())]
    starts = ["Ġ"] + [t for t in pieces if t.startswith("Ġ")] + letters
    while len(vocab) < size:
        left = rng.choice(starts) if rng.random() < 0.5 else pieces[rng.randrange(len(pieces))]
        right = pieces[rng.randrange(min(len(pieces), 64 + len(pieces) // 4))]
        token = left + right
        if token in vocab or len(token) > 12:
            continue
        vocab[token] = len(vocab)
        merges.append((left, right))
        pieces.append(token)
        if left == "Ġ" or left.startswith("Ġ"):
            starts.append(token)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(PLANNER_SPECIAL_TOKENS)
    return planner_tokenizer_from(tok, model_max_length=131072)
