"""The planner's decode loop: prefix reuse, grammar masks overlapped with the forward, string limits.

``TransformersPlanner.generate`` runs this loop instead of ``model.generate`` because three things
need control over each step:

- **Prefix reuse.** ``PrefixCache`` keeps, per session, the KV cache of the last call's sequence
  (prompt and generated tokens). A new call keeps the longest common prefix (token ids equal and the
  same pictures behind equal image tokens, never half an image) and prefills only the rest, with
  the 3-D positions of the *whole* sequence, so the result is the same as a full prefill. Images in
  the kept prefix are not seen by the vision tower again.
- **Grammar masks off the critical path.** The forward of token t+1 is launched (asynchronous on a
  GPU) before the CPU fills xgrammar's mask for it, as xgrammar's own engine integrations do; the
  mask is applied to the logits when they are needed.
- **Jump forward.** Where the grammar forces the next text (an action's keys and punctuation, the
  rest of an enum value once it is unambiguous), its tokens enter in one forward with the token
  before them instead of a decode step each (``TransformersPlanner._jump``).
- **Valid UTF-8 in strings.** xgrammar 0.2.8 accepts overlong and surrogate byte sequences (``E0 9C
  8D``) inside a string, which decode to replacement characters. ``StringLimits`` follows each
  character's bytes, and the loop masks, inside a string, tokens that are not a valid piece of UTF-8
  (``utf8_fragment_ok``) and, after a lead byte whose second byte is restricted, tokens whose first
  byte is outside that range.
- **String lengths without bounded repeats.** A bounded repeat (``{1,N}``) in a JSON-schema pattern
  defeats xgrammar's precomputed token masks (about 68 ms per token with a 151k vocabulary on a
  2-core CPU, against about 3.5 ms for ``+``). Action schemas therefore say ``pattern: ^c+$`` plus
  ``maxLength``; ``compile_schema`` drops those ``maxLength`` before compiling, and ``StringLimits``
  enforces them here: inside a string, tokens whose text would pass the limit are masked, so at the
  limit only a closing quote remains. Lengths are counted in UTF-8 bytes of the JSON text (at least
  the number of characters, so the limit always holds for characters).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

# ---- string limits ------------------------------------------------------------------------------

Path = tuple[str, ...]


def split_limits(schema: Any) -> tuple[Any, dict[Path, int]]:
    """``schema`` without the ``maxLength`` of patterned strings, and those limits by key path.

    A key path is the object keys from the root to the string (array levels add nothing). Where
    alternatives (``anyOf``) give one path different limits, the largest holds."""
    limits: dict[Path, int] = {}

    def walk(node: Any, path: Path) -> Any:
        if isinstance(node, list):
            return [walk(n, path) for n in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        if out.get("type") == "string" and "pattern" in out and "maxLength" in out:
            limits[path] = max(limits.get(path, 0), int(out.pop("maxLength")))
        if isinstance(out.get("properties"), dict):
            out["properties"] = {k: walk(v, (*path, k)) for k, v in out["properties"].items()}
        for key in ("anyOf", "oneOf", "allOf", "items", "prefixItems"):
            if key in out:
                out[key] = walk(out[key], path)
        return out

    return walk(schema, ()), limits


@dataclass
class _Frame:
    is_object: bool
    key: str | None = None
    expect_key: bool = False


@dataclass
class StringLimits:
    """Follows the JSON text being generated, byte by byte, to know whether the next token is inside
    a limited string and how many bytes it may still add."""

    limits: dict[Path, int]
    stack: list[_Frame] = field(default_factory=list)
    in_string: bool = False
    is_key: bool = False
    escape: bool = False
    used: int = 0
    pending: int = 0  # continuation bytes the current UTF-8 character still needs
    need: tuple[int, int] | None = None  # the range the next byte must be in (after E0, ED, F0, F4)
    key_buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.in_string:
                self.need = None
                if self.escape:
                    self.escape = False
                    self.used += 1
                elif b == 0x5C:  # backslash
                    self.escape = True
                    self.used += 1
                elif b == 0x22:  # closing quote
                    self.in_string = False
                    if self.is_key and self.stack:
                        self.stack[-1].key = self.key_buf.decode("utf-8", "replace")
                else:
                    self.used += 1
                    if 0x80 <= b < 0xC0:
                        self.pending = max(0, self.pending - 1)
                    else:
                        self.pending = 3 if b >= 0xF0 else 2 if b >= 0xE0 else 1 if b >= 0xC0 else 0
                        self.need = _SECOND_BYTE.get(b)
                    if self.is_key:
                        self.key_buf.append(b)
                continue
            if b == 0x7B:  # {
                self.stack.append(_Frame(True, expect_key=True))
            elif b == 0x5B:  # [
                self.stack.append(_Frame(False))
            elif b in (0x7D, 0x5D):  # } ]
                if self.stack:
                    self.stack.pop()
            elif b == 0x22:
                self.in_string, self.used, self.escape, self.pending = True, 0, False, 0
                self.is_key = bool(self.stack) and self.stack[-1].is_object and self.stack[-1].expect_key
                self.key_buf = bytearray()
            elif b == 0x3A and self.stack:  # :
                self.stack[-1].expect_key = False
            elif b == 0x2C and self.stack and self.stack[-1].is_object:  # ,
                self.stack[-1].expect_key = True

    def remaining(self) -> int | None:
        """Bytes the current string may still take, or None where no limit applies (outside a
        limited string). An escape or a UTF-8 character begun within the limit may be completed
        (its remaining bytes are added), so the grammar always has a token left."""
        if not self.in_string or self.is_key:
            return None
        path = tuple(f.key or "" for f in self.stack if f.is_object)
        limit = self.limits.get(path)
        if limit is None:
            return None
        return max(0, limit - self.used) + (1 if self.escape else self.pending)


# UTF-8 lead bytes whose second byte is restricted (no overlong forms, no surrogates, nothing past U+10FFFF).
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def utf8_fragment_ok(data: bytes) -> bool:
    """Whether ``data`` can be a piece of valid UTF-8: leading continuation bytes (the end of a
    character begun before) and an unfinished last character are allowed; bytes that are never
    UTF-8 (C0, C1, F5-FF), overlong forms, surrogates and broken sequences are not."""
    i, n = 0, len(data)
    while i < n and i < 3 and 0x80 <= data[i] < 0xC0:
        i += 1
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        if b < 0xC2 or b > 0xF4:
            return False
        k = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
        lo, hi = _SECOND_BYTE.get(b, (0x80, 0xBF))
        for j in range(1, k + 1):
            if i + j >= n:
                return True  # the character goes on in the next token
            c = data[i + j]
            if not ((lo <= c <= hi) if j == 1 else (0x80 <= c < 0xC0)):
                return False
        i += k + 1
    return True


def utf8_refusals(decoded_vocab: list[bytes], size: int) -> list[list[bool]]:
    """For each number of continuation bytes the current character still needs (0 to 3), which
    tokens may not come next inside a string: those that are no piece of valid UTF-8, and those
    whose leading continuation bytes do not finish the character (too many, too few, or some where
    none is due). A token past the tokenizer's vocabulary is refused."""
    out = [[True] * size for _ in range(4)]
    for i, tok in enumerate(decoded_vocab[:size]):
        if not tok or not utf8_fragment_ok(tok):
            continue
        lead = 0
        while lead < len(tok) and 0x80 <= tok[lead] < 0xC0:
            lead += 1
        for pending in range(4):
            fits = lead == pending or (lead == len(tok) and lead < pending)
            out[pending][i] = not fits
    return out


def in_string_lengths(decoded_vocab: list[bytes], size: int) -> list[int]:
    """For each token, the bytes it adds to a JSON string before its first quote (a token past the
    tokenizer's vocabulary counts as endless)."""
    big = 1 << 20
    out = [big] * size
    for i, tok in enumerate(decoded_vocab[:size]):
        n, escaped = len(tok), False
        for j, b in enumerate(tok):  # the first quote that is not escaped within the token
            if escaped:
                escaped = False
            elif b == 0x5C:
                escaped = True
            elif b == 0x22:
                n = j
                break
        out[i] = n
    return out


# ---- prefix reuse -------------------------------------------------------------------------------


def image_digest(image: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class CachedPrefix:
    """A KV cache and what it holds: token ids and the images behind the image-token spans."""

    cache: Any
    ids: list[int]
    spans: list[tuple[int, int, str]]  # (start, end, image digest), end exclusive


@dataclass
class PrefixCache:
    """Per-key (session) KV caches, least recently used first out.

    ``max_entries`` bounds the number of sessions held; ``max_tokens`` the tokens one entry may
    hold (a longer sequence is not kept). Entries are taken out while a call uses them, so two calls
    never share one cache object."""

    max_entries: int = 4
    max_tokens: int = 32768
    entries: OrderedDict[str, CachedPrefix] = field(default_factory=OrderedDict)

    def take(self, key: str | None) -> CachedPrefix | None:
        if key is None:
            return None
        return self.entries.pop(key, None)

    def put(self, key: str | None, entry: CachedPrefix) -> None:
        if key is None or self.max_entries <= 0 or len(entry.ids) > self.max_tokens:
            return
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def forget(self, key: str | None = None) -> None:
        """Drop one session's cache (all when ``key`` is None)."""
        if key is None:
            self.entries.clear()
        else:
            self.entries.pop(key, None)


def common_prefix(entry: CachedPrefix, ids: list[int], spans: list[tuple[int, int, str]]) -> int:
    """How many leading tokens of (ids, spans) the cached entry holds exactly."""
    n = min(len(entry.ids), len(ids))
    p = 0
    while p < n and entry.ids[p] == ids[p]:
        p += 1
    cached = {start: (end, digest) for start, end, digest in entry.spans}
    for start, end, digest in spans:
        if start >= p:
            break
        if cached.get(start) != (end, digest) or end > p:  # another picture, or half of one kept
            return start
    return p


def crop(cache: Any, keep: int) -> None:
    drop = int(cache.get_seq_length()) - keep
    if drop > 0:
        cache.crop(-drop)


def fresh_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config())


def static_cache(model: Any, tokens: int) -> Any:
    from transformers import StaticCache

    return StaticCache(config=model.config.get_text_config(), max_cache_len=tokens)


# ---- sampling -----------------------------------------------------------------------------------


def apply_bitmask(logits: Any, bitmask: Any) -> None:
    """Set the logits of tokens xgrammar's ``bitmask`` disallows to -inf, in place (``logits``: one
    row). On the CPU this is xgrammar's own kernel; on a GPU a few plain torch ops unpack the bits
    (token i is allowed when bit i % 32 of word i // 32 is set), so no kernel is built at run time."""
    if logits.device.type == "cpu":
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), bitmask)
        return
    logits.masked_fill_(~allowed_tokens(bitmask, logits.shape[0], logits.device), float("-inf"))


def allowed_tokens(bitmask: Any, size: int, device: Any) -> Any:
    """xgrammar's packed bitmask (one row) as a boolean tensor of ``size`` tokens on ``device``."""
    import torch

    words = bitmask[0].to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    return ((words.unsqueeze(1) >> shifts) & 1).reshape(-1)[:size].bool()


def sample(logits: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """One token id (a 1-element tensor) from ``logits`` of shape (vocab,)."""
    import torch

    if temperature <= 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    scores = logits / temperature
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[-1:] = False
        scores = scores.scatter(0, order, sorted_scores.masked_fill(remove, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
