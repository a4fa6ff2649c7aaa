"""Checks on user input that run before any model loads (cheap, import-light).

Every entry point (the CLI, ``Agent``, ``Session``) calls these first, so a bad prompt, seed or output
folder is one clear line at once, not an error after the models loaded and the turn ran.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from duogen_agents.errors import ConfigError

MAX_PROMPT_CHARS = 20_000
# Seeds are stored in a 32-bit column and feed torch generators: 0 .. 2**31 - 1.
MAX_SEED = 2**31 - 1


def check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError('the prompt is empty; say what you want, e.g. duogen run "How do I repot a plant?"')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ConfigError(f"the prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return check_text(prompt, "the prompt")


def check_text(text: str, what: str) -> str:
    """``text`` can be stored and tokenized: valid Unicode (no lone surrogate, which is what a byte
    that is not UTF-8 becomes in a command-line argument) and no NUL (PostgreSQL's text refuses it)."""
    if "\x00" in text:
        raise ConfigError(f"{what} holds a NUL character (at {text.index(chr(0)) + 1}); remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{what} is not valid text: character {e.start + 1} is not Unicode (a byte that is not UTF-8?)"
        ) from None
    return text


def check_seed(seed: object) -> int | None:
    """``None`` (the preset's seed) or an int in 0..``MAX_SEED`` (a bool is not a seed)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed {seed!r} is out of range; use a whole number from 0 to {MAX_SEED}")
    return seed


def validation_line(errors: Any) -> str:
    """The first of pydantic's (or FastAPI's) validation errors as one line: ``where: what``."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and first.get("type") == "missing":
        return "a JSON request body is required"
    where = ".".join(str(p) for p in loc if p != "body")
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def check_out_dir(path: Path | str) -> Path:
    """``path`` is (or can be created as) a folder we can write: tried for real, so a read-only
    mount is caught even for root, for whom permission bits do not apply."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write in {probe} ({e.strerror or e})") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {probe} is not writable")
    return out
