"""Decode steps per planner action with and without jump forward, with a 151k-token vocabulary.

    python benchmarks/jump_forward.py

Replays written-out actions of a visual plan (the plan, a step, a check) through xgrammar's matcher
the way ``TransformersPlanner._decode`` does: each token of the action's own tokenization is a decode
step, except where the grammar forces the next text (``find_jump_forward_string``): that text is
tokenized on its own and enters with the token before it, in the same forward. Prints tokens, forced
tokens and forwards per action. The tokenizer is ``_vocab.real_size_tokenizer`` (a byte-level BPE of
Qwen's size, built locally); Qwen's own merges JSON punctuation more, so it forces fewer tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

REFS = ["a1b2c3d4e5f6"]


def actions() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    from duogen_agents.graphs.actions import check_schema, plan_schema, step_schema

    return {
        "plan": (
            plan_schema(min_steps=2, max_steps=8, max_title=80),
            {
                "title": "Repotting a basil plant",
                "steps": [
                    {"title": "Water the plant a day before"},
                    {"title": "Loosen the root ball"},
                    {"title": "Set it in the new pot"},
                    {"title": "Fill with soil and water"},
                ],
            },
        ),
        "step": (
            step_schema(REFS, max_text=600, max_prompt=240, max_refs=4),
            {
                "text": "Water the basil thoroughly the day before so the root ball holds together and slides "
                "out of the old pot in one piece.",
                "image": {
                    "prompt": "a basil plant in a small terracotta pot being watered from a can, kitchen windowsill, "
                    "soft daylight",
                    "references": REFS,
                    "kind": "continue",
                },
            },
        ),
        "check": (
            check_schema(),
            {"verdict": "ok", "note": "the picture shows the watering can and the basil as asked"},
        ),
    }


def replay(compiler: Any, tokenizer: Any, schema: dict[str, Any], text: str) -> tuple[int, int, int]:
    """(tokens, forced tokens, forwards) of ``text`` decoded under ``schema`` with jump forward."""
    import xgrammar as xgr

    from duogen_agents.models.decoding import split_limits

    stripped, _ = split_limits(schema)
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(stripped), any_whitespace=False))
    pos = tokens = forced = forwards = 0
    while pos < len(text):
        jump = matcher.find_jump_forward_string()
        if jump and text.startswith(jump, pos) and forwards:  # joins the previous token's forward
            ids = tokenizer.encode(jump, add_special_tokens=False)
            for t in ids:
                assert matcher.accept_token(t)
            pos, tokens, forced = pos + len(jump), tokens + len(ids), forced + len(ids)
            continue
        # the model's own next token: the first token of the rest, as the tokenizer splits it
        t = tokenizer.encode(text[pos:], add_special_tokens=False)[0]
        piece = tokenizer.decode([t])
        assert matcher.accept_token(t), piece
        pos, tokens, forwards = pos + len(piece), tokens + 1, forwards + 1
    return tokens, forced, forwards


def main() -> None:
    import xgrammar as xgr
    from _vocab import real_size_tokenizer

    tokenizer = real_size_tokenizer()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgr.GrammarCompiler(info)
    print(f"vocabulary {len(tokenizer):,} tokens (byte-level BPE, built locally)")
    print(f"{'action':8s} {'tokens':>7s} {'forced':>7s} {'forwards':>9s} {'saved':>6s}")
    for name, (schema, obj) in actions().items():
        tokens, forced, forwards = replay(compiler, tokenizer, schema, json.dumps(obj))
        print(f"{name:8s} {tokens:7d} {forced:7d} {forwards:9d} {1 - forwards / tokens:6.0%}")


if __name__ == "__main__":
    main()
