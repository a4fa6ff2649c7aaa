"""The planner: a transformers image-text-to-text model decoding under a grammar.

``TransformersPlanner`` loads any image-text-to-text checkpoint (Qwen2.5-VL, Qwen3-VL, ...) through
``AutoModelForImageTextToText`` and ``AutoProcessor``. Prompts are built with the model's own chat
template, earlier images passed as images. All text (the user's and the model's own earlier output)
is tokenized with special-token splitting, so a user who types ``<|im_end|>`` gets those characters,
not an end-of-turn token. Decoding is constrained by an xgrammar grammar compiled from a JSON schema.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from duogen_agents.errors import GenerationError, PromptTooLongError
from duogen_agents.models.decoding import (
    CachedPrefix,
    PrefixCache,
    StringLimits,
    apply_bitmask,
    common_prefix,
    crop,
    fresh_cache,
    image_digest,
    in_string_lengths,
    sample,
    split_limits,
    static_cache,
    utf8_refusals,
)
from duogen_agents.models.loading import generating, loading, resolve_device, resolve_dtype, resolve_source
from duogen_agents.models.protocols import ChatTurn, PlannerOutput, TokenCallback
from duogen_agents.models.residency import residency_for
from duogen_agents.models.serial import device_turn
from duogen_agents.presets import PlannerSpec

log = logging.getLogger("duogen.planner")

# Bytes of processed pictures (pixel rows) ``encode`` keeps for reuse: about 28 pictures of 704x1280
# at the 7B preset's max_pixels (9 MB each in float32).
PIECE_CACHE_BYTES = 256 * 2**20

# A jump forward on the compiled path is one eager forward (on an H200 at 7B, about 30 ms against about
# 10-14 ms per compiled step): a shorter jump goes through the compiled step a token at a time.
JUMP_MIN_COMPILED = 3

_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass
class _Streamer:
    """Decodes generated tokens incrementally and hands on whole characters: each step decodes a
    short window (from the token before the last piece handed on), not everything so far, as
    vLLM's incremental detokenizer does."""

    tokenizer: Any
    on_token: TokenCallback
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # window start: context for the decoder (a leading space, say)
    read: int = 0  # tokens handed on

    def push(self, token: int) -> bool:
        """Whether ``on_token`` asked to end decoding (returned True)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) > len(before) and not text.endswith("\ufffd"):  # else a character is incomplete
            halt = self.on_token(text[len(before) :]) is True
            self.prefix, self.read = self.read, len(self.ids)
            return halt
        return False


class TransformersPlanner:
    """A local planner on transformers. Build it with ``from_spec``."""

    def __init__(self, model: Any, processor: Any, spec: PlannerSpec, source: str = "") -> None:
        import xgrammar as xgr

        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.spec = spec
        self.source = source
        self.device = str(next(model.parameters()).device)
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.stop_token_ids = sorted({*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id})
        vocab_size = model.config.get_text_config().vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids
        )
        # xgrammar 0.2.8's own cache fails some schemas ("per_rule_fsm_hashes" check), e.g. a step
        # schema with 200-char text and 80-char prompts; compile uncached and keep our own cache.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._grammar_lock = threading.Lock()
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        self.vocab_size = vocab_size
        # The most tokens a call may hold, prompt and answer (Qwen2.5-VL-7B: 128,000).
        self.context_tokens = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 2**31)
        self._token_bytes: list[bytes] = list(info.decoded_vocab)
        self._in_string_list = in_string_lengths(self._token_bytes, vocab_size)
        self._longest_token = max((len(b) for b in self._token_bytes), default=1)
        self._in_string: Any = None
        self._utf8_list = utf8_refusals(self._token_bytes, vocab_size)
        self._utf8: Any = None  # the same, as boolean tensors on the device
        self._first_byte: Any = None
        self._base = getattr(model, "model", model)  # the part that owns get_rope_index
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.prefix_cache = PrefixCache(max_entries=spec.prefix_cache)
        # encode's processed template pieces with pictures, by (piece, picture digests); least recently
        # used out beyond PIECE_CACHE_BYTES of tensors.
        self._pieces: OrderedDict[tuple[str, tuple[str, ...]], tuple[dict[str, Any], int]] = OrderedDict()
        self._piece_total = 0  # bytes held
        self._pieces_lock = threading.Lock()
        # spec.compile: one static KV cache (fixed addresses, as CUDA graphs need) and a compiled
        # decode step, built on first use; prefill stays eager (its length varies).
        self._static: Any = None
        self._compiled_step: Any = None
        self.residency_role: str | None = None  # set by residency.offload_planner (preset offload)
        # Each session's last call (conversation, output): the aligned image family reads the
        # planner's states at an image request from it.
        self.last_calls: OrderedDict[str, tuple[list[ChatTurn], str]] = OrderedDict()

    @classmethod
    def from_spec(cls, spec: PlannerSpec, models_dir: Path | None = None) -> TransformersPlanner:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if spec.model.startswith("tiny:"):
            from duogen_agents.models.tiny import ensure_tiny_planner

            if models_dir is None:
                raise GenerationError("the tiny planner needs a models cache directory")
            family = spec.model.split(":", 1)[1]
            with loading("tiny planner", spec.model):
                source = str(ensure_tiny_planner(models_dir, family))
        else:
            source = resolve_source(spec.model, "planner")
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        if spec.compile and not device.startswith("cuda"):  # CUDA graphs need a GPU; eager is faster here
            spec = spec.model_copy(update={"compile": False})
        with loading("planner", source):
            proc_kwargs: dict[str, Any] = {}
            if spec.min_pixels:
                proc_kwargs["min_pixels"] = spec.min_pixels
            if spec.max_pixels:
                proc_kwargs["max_pixels"] = spec.max_pixels
            processor = AutoProcessor.from_pretrained(source, **proc_kwargs)
            tokenizer = getattr(processor, "tokenizer", None)
            if getattr(processor, "chat_template", None) is None and getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("the checkpoint has no chat template")  # checked before loading the weights
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
            model.to(device)
            model.eval()
        return cls(model, processor, spec, source)

    # ---- prompt building -----------------------------------------------------------------------

    def encode(self, conversation: Sequence[ChatTurn], *, reuse: bool = True) -> dict[str, Any]:
        """Token ids and vision inputs for ``conversation``, followed by the assistant prompt.

        ``reuse``: a template piece with pictures (the turn's opening, say, and its images) that an
        earlier call processed with the same pictures (by digest) is taken from a bounded cache
        instead of running the image processor again, so each picture of a session is resized and
        normalised once (``reuse=False``: every piece afresh; the result is the same)."""
        import torch

        texts: list[str] = []
        images: list[Image.Image] = []
        templated: list[dict[str, Any]] = []
        for turn in conversation:
            content: list[dict[str, Any]] = []
            for part in turn["content"]:
                if part["type"] == "image":
                    images.append(part["image"])  # type: ignore[typeddict-item]
                    content.append({"type": "image"})
                else:
                    content.append({"type": "text", "text": _PLACEHOLDER.format(len(texts))})
                    texts.append(part["text"])  # type: ignore[typeddict-item]
            templated.append({"role": turn["role"], "content": content})
        rendered: str = self.processor.apply_chat_template(templated, add_generation_prompt=True, tokenize=False)

        ids: list[torch.Tensor] = []
        mm_types: list[torch.Tensor] = []
        pixel_values: list[torch.Tensor] = []
        grids: list[torch.Tensor] = []
        digests = [image_digest(im) for im in images]
        used = 0  # pictures consumed by the pieces so far
        has_mm_types = False
        pos = 0
        pieces: list[tuple[str, str]] = []
        for m in _PLACEHOLDER_RE.finditer(rendered):
            pieces.append(("template", rendered[pos : m.start()]))
            pieces.append(("text", texts[int(m.group(1))]))
            pos = m.end()
        pieces.append(("template", rendered[pos:]))
        for kind, piece in pieces:
            if not piece:
                continue
            if kind == "text":
                tok = self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True, return_tensors="pt")
                ids.append(tok["input_ids"][0])
                mm_types.append(torch.zeros_like(tok["input_ids"][0]))
                continue
            n_images = piece.count(self.image_token)
            seg_images, seg_digests = images[used : used + n_images], digests[used : used + n_images]
            used += n_images
            enc = self._processed(piece, seg_images, seg_digests, reuse)
            ids.append(enc["input_ids"][0])
            has_mm_types = has_mm_types or "mm_token_type_ids" in enc
            mm_types.append(enc.get("mm_token_type_ids", torch.zeros_like(enc["input_ids"]))[0])
            if seg_images:
                pixel_values.append(enc["pixel_values"])
                grids.append(enc["image_grid_thw"])
        input_ids = torch.cat(ids).unsqueeze(0)
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if has_mm_types:  # transformers 5 processors return it; older ones do not
            out["mm_token_type_ids"] = torch.cat(mm_types).unsqueeze(0)
        if pixel_values:
            out["pixel_values"] = torch.cat(pixel_values)
            out["image_grid_thw"] = torch.cat(grids)
            out["image_digests"] = digests
        return out

    def _processed(self, piece: str, images: list[Image.Image], digests: list[str], reuse: bool) -> Any:
        """The processor's output for one template piece and its pictures, through the piece cache."""
        import torch

        if not images or not reuse:
            return self.processor(text=[piece], images=images or None, return_tensors="pt")
        key = (piece, tuple(digests))
        with self._pieces_lock:
            if (hit := self._pieces.get(key)) is not None:
                self._pieces.move_to_end(key)
                return hit[0]
        enc = dict(self.processor(text=[piece], images=images, return_tensors="pt"))
        size = sum(v.numel() * v.element_size() for v in enc.values() if isinstance(v, torch.Tensor))
        with self._pieces_lock:
            if key not in self._pieces:
                self._pieces[key] = (enc, size)
                self._piece_total += size
                while len(self._pieces) > 1 and self._piece_total > PIECE_CACHE_BYTES:
                    _, (_, dropped) = self._pieces.popitem(last=False)
                    self._piece_total -= dropped
        return enc

    # ---- decoding ------------------------------------------------------------------------------

    def compile(self, schema: dict[str, Any]) -> tuple[Any, dict[Any, int]]:
        """The xgrammar grammar of ``schema`` and the string limits enforced while decoding."""
        # The grammar writes an object's properties in the schema's order (the order the graph's actions
        # declare: "type" before the content, the text before its picture's prompt, and the order stage 1
        # trains on), so the key keeps that order too.
        key = json.dumps(schema)
        with self._grammar_lock:  # callers in several threads (duogen serve checks schemas up front)
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        stripped, limits = split_limits(schema)
        try:
            grammar = self._compiler.compile_json_schema(json.dumps(stripped), any_whitespace=False)
        except RuntimeError as e:
            raise GenerationError(f"cannot compile the planner grammar: {_xgrammar_message(e)}") from e
        with self._grammar_lock:
            self._grammars[key] = compiled = (grammar, limits)
            if len(self._grammars) > 64:
                self._grammars.popitem(last=False)
        return compiled

    def check_context(self, conversation: Sequence[ChatTurn]) -> int:
        """The conversation's tokens; ``PromptTooLongError`` when they leave no room for an answer in
        the model's context (what ``generate`` checks first: a server checks it before it streams)."""
        return self._fits(self.encode(conversation))

    def _fits(self, enc: dict[str, Any]) -> int:
        n = int(enc["input_ids"].shape[1])
        if n >= self.context_tokens:
            raise PromptTooLongError(
                f"the conversation is {n} tokens; the planner reads at most {self.context_tokens - 1} "
                "before its answer (its context): shorten it"
            )
        return n

    def forget(self, cache_key: str | None = None) -> None:
        """Drop the kept KV cache of one session (``cache_key``), or of all sessions (and then the
        processed pictures ``encode`` keeps too)."""
        with device_turn(self.device):
            self.prefix_cache.forget(cache_key)
            if cache_key is None:
                with self._pieces_lock:
                    self._pieces.clear()
                    self._piece_total = 0

    def generate(
        self,
        conversation: Sequence[ChatTurn],
        schema: dict[str, Any] | None,
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        on_token: TokenCallback | None = None,
        cache_key: str | None = None,
        client_schema: bool = False,
    ) -> PlannerOutput:
        """Continue ``conversation``: under the grammar of the JSON ``schema``, or free text (None).

        ``cache_key`` names the session: the KV cache of this call is kept under it, and the next
        call with the same key prefills only what its conversation adds (see ``decoding``).
        ``client_schema``: a schema from a client decodes without jump forward, whose search for the
        forced text has no bound in xgrammar (a required self-reference, ``minItems: 1e6`` of a
        constant: it allocates until the process is killed); token by token, ``max_new_tokens`` bounds it.
        A conversation longer than the model's context is refused (``PromptTooLongError``), and so is
        one whose answer runs past the context's end (rather than an answer cut short there)."""
        import torch

        # One call per device at a time: a GPU runs one model faster alone than two side by side,
        # and the kept caches are used by one call at a time.
        with device_turn(self.device), generating("planner"), torch.inference_mode():
            if self.residency_role is not None:
                residency_for(self.device).use(self.residency_role)
            grammar, limits = self.compile(schema) if schema is not None else (None, {})
            enc = self.encode(conversation)
            n = self._fits(enc)
            key = "" if cache_key is None else cache_key
            asked = max_new_tokens or self.spec.max_new_tokens
            budget = min(asked, self.context_tokens - n)
            clamped = budget < asked  # by the context's end
            jump = self.spec.jump_forward and not client_schema
            # Cut at the context's end, the answer may be refused: its tokens are held back until it
            # is whole, so a caller that tries again with less (the graph) never streams a refused one.
            held: list[str] | None = [] if clamped and on_token is not None else None
            stream = held.append if held is not None else on_token
            out = self._decode(enc, grammar, limits, budget, seed, stream, key, jump)
            if clamped and not out.complete:
                raise PromptTooLongError(
                    f"the conversation is {n} tokens; its answer ran past the planner's context "
                    f"({self.context_tokens} tokens): shorten it"
                )
            for piece in held or ():
                on_token(piece)  # type: ignore[misc]
            self.last_calls[key] = (list(conversation), out.text)
            self.last_calls.move_to_end(key)
            while len(self.last_calls) > 64:
                self.last_calls.popitem(last=False)
            return out

    def _positions(self, enc: dict[str, Any]) -> tuple[Any, int]:
        """Positions of the whole sequence as Qwen-VL's ``generate`` builds them: a row of text
        positions above the three M-RoPE rows; and the offset of the M-RoPE rows after it."""
        import torch

        ids = enc["input_ids"]
        n = ids.shape[1]
        text = torch.arange(n).view(1, 1, n)
        if "image_grid_thw" not in enc:
            return torch.cat([text, text.expand(3, 1, n)]), 0
        types = enc.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).int()
        vision, deltas = self._base.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=enc["image_grid_thw"])
        return torch.cat([text, vision.to(text.dtype)]), int(deltas.reshape(-1)[0])

    def _spans(self, ids: list[int], images: list[str]) -> list[tuple[int, int, str]]:
        spans: list[tuple[int, int, str]] = []
        i, n, k = 0, len(ids), 0
        while i < n:
            if ids[i] == self.image_token_id:
                j = i
                while j < n and ids[j] == self.image_token_id:
                    j += 1
                spans.append((i, j, images[k] if k < len(images) else ""))
                k, i = k + 1, j
            else:
                i += 1
        return spans

    def _forward(self, ids: Any, positions: Any, cache: Any, mask: Any = None, **vision: Any) -> Any:
        """One forward over ``ids`` after what ``cache`` holds. ``mask``: the 2-D attention mask over
        everything so far (all ones), passed as ``generate`` passes it."""
        out = self.model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
            **vision,
        )
        return out.logits[0, -1].float()  # masks and sampling in float32, as generate() does

    def _decode(
        self,
        enc: dict[str, Any],
        grammar: Any,
        limits: dict[Any, int],
        budget: int,
        seed: int | None,
        on_token: TokenCallback | None,
        cache_key: str,
        jump: bool,
    ) -> PlannerOutput:
        import torch
        import xgrammar as xgr

        ids: list[int] = enc["input_ids"][0].tolist()
        spans = self._spans(ids, enc.get("image_digests", []))
        positions, delta = self._positions(enc)
        n = len(ids)

        # Keep what the session's cache holds of this sequence (at least one token is prefilled,
        # for the logits), and prefill the rest.
        static = self.spec.compile and n + budget <= self.spec.static_cache_tokens
        entry = self.prefix_cache.take(cache_key) if self.spec.prefix_cache else None
        if entry is not None and static != (entry.cache is self._static):
            entry = None  # kept by the other path
        if static:  # this call overwrites the static cache: no other entry may point at it
            for other in [k for k, e in self.prefix_cache.entries.items() if e.cache is self._static]:
                self.prefix_cache.entries.pop(other)
        keep = min(common_prefix(entry, ids, spans), n - 1) if entry is not None else 0
        for start, end, _ in spans:  # never half an image (keep may have dropped to n - 1)
            if start < keep < end:
                keep = start
        if static:
            if self._static is None:
                self._static = static_cache(self.model, self.spec.static_cache_tokens)
            cache = self._static
            crop(cache, keep)
        elif entry is None or keep == 0:
            cache = fresh_cache(self.model)
        else:
            cache = entry.cache
            crop(cache, keep)
        vision: dict[str, Any] = {}
        if "pixel_values" in enc:
            grids = enc["image_grid_thw"]
            rows = grids.prod(-1).tolist()
            first = sum(1 for start, _, _ in spans if start < keep)  # images already in the cache
            if first < len(rows):
                skip = sum(rows[:first])
                vision = {
                    "pixel_values": enc["pixel_values"][skip:].to(self.device, self.model.dtype),
                    "image_grid_thw": grids[first:].to(self.device),
                }
        # generate() passes a 2-D mask of ones; so do we (views of one tensor), except on the static
        # cache, whose compiled step must see the same shapes at every step.
        ones = None if static else torch.ones(1, n + budget, dtype=torch.long, device=self.device)
        logits = self._forward(
            enc["input_ids"][:, keep:], positions[:, :, keep:], cache, None if ones is None else ones[:, :n], **vision
        )

        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        matcher = xgr.GrammarMatcher(grammar) if grammar is not None else None
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size) if matcher is not None else None
        tracker = StringLimits(limits) if matcher is not None else None
        streamer = _Streamer(self.tokenizer, on_token) if on_token else None
        stop = set(self.stop_token_ids)
        out: list[int] = []
        fed = 0  # generated tokens whose keys and values are in the cache
        jumped = 0  # generated tokens the grammar forced (entered by a jump forward)
        if matcher is not None:
            matcher.fill_next_token_bitmask(bitmask)
        while True:
            if matcher is not None:
                apply_bitmask(logits, bitmask)
                if tracker is not None and tracker.in_string and not tracker.is_key:
                    self._utf8_mask(logits, tracker)
                room = tracker.remaining() if tracker is not None else None
                if room is not None and room < self._longest_token:
                    logits.masked_fill_(self._in_string_len(logits.device) > room, float("-inf"))
            token = int(sample(logits, self.spec.temperature, self.spec.top_p, generator))
            out.append(token)
            if matcher is not None:
                if not matcher.accept_token(token):
                    raise GenerationError("the planner produced a token its grammar does not allow")
                done = matcher.is_terminated()
            else:
                done = token in stop
            complete = done
            done = done or len(out) >= budget
            forced: list[int] = []
            if not done and matcher is not None and jump:
                forced = self._jump(matcher, budget - len(out) - 1)
            if not done:  # launched first: on a GPU the forward runs while the CPU works below
                n_pos, k = n + fed, 1 + len(forced)
                text_pos = torch.arange(n_pos, n_pos + k)
                step = torch.stack([text_pos] + [text_pos + delta] * 3).view(4, 1, k)
                if static and len(forced) < JUMP_MIN_COMPILED:  # replayed steps: the same tokens either way
                    for j, t in enumerate((token, *forced)):
                        logits = self._compiled_forward(torch.tensor([[t]]), step[:, :, j : j + 1].contiguous(), cache)
                else:  # one forward over the token and the forced text (eager; a jump on the compiled path)
                    logits = self._forward(
                        torch.tensor([[token, *forced]]), step, cache, None if ones is None else ones[:, : n_pos + k]
                    )
                fed += k
                out.extend(forced)
                jumped += len(forced)
            for t in (token, *forced):
                if tracker is not None:
                    tracker.feed(self._token_bytes[t] if t < len(self._token_bytes) else b"")
                if streamer is not None and t not in stop and streamer.push(t):
                    complete = done = True  # the caller has what it wants (a stop sequence)
            if done:
                break
            if matcher is not None:
                matcher.fill_next_token_bitmask(bitmask)

        self.prefix_cache.put(cache_key, CachedPrefix(cache, ids + out[:fed], spans))
        new = [t for t in out if t not in stop]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return PlannerOutput(
            text=text,
            num_tokens=len(out),
            prompt_tokens=n,
            prefill_tokens=n - keep,
            forced_tokens=jumped,
            complete=complete,
        )

    def _jump(self, matcher: Any, room: int) -> list[int]:
        """The tokens of the text the grammar forces next (xgrammar's jump-forward string, e.g.
        ``", "image": {"prompt": "``), accepted by ``matcher``, at most ``room`` of them; none when
        nothing is forced. The text is tokenized on its own, as the tokenizer splits it; a token the
        grammar refuses ends the jump there. The tokens are the same on the compiled path, where a
        jump shorter than ``JUMP_MIN_COMPILED`` goes through the compiled step a token at a time."""
        try:
            text = matcher.find_jump_forward_string() if room > 0 else ""
        except UnicodeDecodeError:  # the forced bytes begin or end inside a character (a non-ASCII enum)
            return []
        if not text:
            return []
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:room]
        taken: list[int] = []
        for t in ids:
            if not matcher.accept_token(t):
                break
            taken.append(t)
        return taken

    def _compiled_forward(self, ids: Any, positions: Any, cache: Any) -> Any:
        """One decode step through ``torch.compile`` with CUDA graphs: compiled on the first call of
        the process, then replayed; the logits are copied out of the graph's buffer. On a CPU the
        step runs eagerly on the static cache (compiling there costs more than it saves)."""
        import torch

        first = self._compiled_step is None
        if first:
            if self.device.startswith("cuda"):
                self._compiled_step = torch.compile(self.model.forward, mode="reduce-overhead", dynamic=False)
            else:
                self._compiled_step = self.model.forward
        started = time.perf_counter()
        out = self._compiled_step(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        logits = out.logits[0, -1].to(torch.float32, copy=True)  # the graph's output buffer is reused
        if first and self.device.startswith("cuda"):
            log.info("planner: decode step compiled in %.1f s (once per process)", time.perf_counter() - started)
        return logits

    def _utf8_mask(self, logits: Any, tracker: StringLimits) -> None:
        """Inside a string: only tokens that continue valid UTF-8 (``decoding.utf8_refusals``, and
        after E0/ED/F0/F4 the restricted range of the second byte)."""
        import torch

        if self._utf8 is None or self._utf8.device != logits.device:
            self._utf8 = torch.tensor(self._utf8_list, dtype=torch.bool, device=logits.device)
            first = [t[0] if t else 256 for t in self._token_bytes[: self.vocab_size]]
            first += [256] * (self.vocab_size - len(first))
            self._first_byte = torch.tensor(first, dtype=torch.int16, device=logits.device)
        logits.masked_fill_(self._utf8[min(tracker.pending, 3)], float("-inf"))
        if tracker.need is not None:
            lo, hi = tracker.need
            logits.masked_fill_((self._first_byte < lo) | (self._first_byte > hi), float("-inf"))

    def _in_string_len(self, device: Any) -> Any:
        if self._in_string is None or self._in_string.device != device:
            import torch

            self._in_string = torch.tensor(self._in_string_list, dtype=torch.int32, device=device)
        return self._in_string


def _xgrammar_message(e: BaseException) -> str:
    """xgrammar's first line without its log prefix (``[16:24:48] /project/cpp/...cc:4944: ``)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", line)
