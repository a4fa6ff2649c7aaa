"""The planner: a transformers image-text-to-text model decoding under a grammar.

``TransformersPlanner`` loads any image-text-to-text checkpoint (Qwen2.5-VL, Qwen3-VL, ...) through
``AutoModelForImageTextToText`` and ``AutoProcessor``. Prompts are built with the model's own chat
template, earlier images passed as images. All text (the user's and the model's own earlier output)
is tokenized with special-token splitting, so a user who types ``<|im_end|>`` gets those characters,
not an end-of-turn token. Decoding is constrained by an xgrammar grammar compiled from a JSON schema.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from duogen_agents.errors import GenerationError
from duogen_agents.models.loading import generating, loading, resolve_device, resolve_dtype, resolve_source
from duogen_agents.models.protocols import ChatTurn, PlannerOutput, TokenCallback
from duogen_agents.models.serial import device_turn
from duogen_agents.presets import PlannerSpec

_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass
class _Streamer:
    """A transformers streamer that decodes incrementally, in the generating thread (no threads)."""

    tokenizer: Any
    on_token: TokenCallback
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    _prompt_seen: bool = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        if len(text) > self.sent:
            self.on_token(text[self.sent :])
            self.sent = len(text)

    def end(self) -> None:
        pass


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
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")

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

    def encode(self, conversation: Sequence[ChatTurn]) -> dict[str, Any]:
        """Token ids and vision inputs for ``conversation``, followed by the assistant prompt."""
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
        image_iter = iter(images)
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
            seg_images = [next(image_iter) for _ in range(n_images)]
            enc = self.processor(text=[piece], images=seg_images or None, return_tensors="pt")
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
        return out

    # ---- decoding ------------------------------------------------------------------------------

    def compile(self, schema: dict[str, Any]) -> Any:
        key = json.dumps(schema, sort_keys=True)
        if key in self._grammars:
            self._grammars.move_to_end(key)
            return self._grammars[key]
        try:
            grammar = self._compiler.compile_json_schema(key, any_whitespace=False)
        except RuntimeError as e:
            raise GenerationError(f"cannot compile the planner grammar: {str(e).strip().splitlines()[0]}") from e
        self._grammars[key] = grammar
        if len(self._grammars) > 64:
            self._grammars.popitem(last=False)
        return grammar

    def generate(
        self,
        conversation: Sequence[ChatTurn],
        schema: dict[str, Any] | None,
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        on_token: TokenCallback | None = None,
    ) -> PlannerOutput:
        """Continue ``conversation``: under the grammar of the JSON ``schema``, or free text (None)."""
        import torch
        import xgrammar as xgr

        # One call per device at a time: the seed below sets torch's global RNG, and a GPU runs one
        # model faster alone than two side by side.
        with device_turn(self.device), generating("planner"):
            grammar = self.compile(schema) if schema is not None else None  # None: free text
            inputs = {k: v.to(self.device) for k, v in self.encode(conversation).items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            if seed is not None:
                torch.manual_seed(seed)
            do_sample = self.spec.temperature > 0
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": self.spec.temperature, "top_p": self.spec.top_p, "top_k": 0}
                if do_sample
                else {"do_sample": False}
            )
            streamer = _Streamer(self.tokenizer, on_token) if on_token else None
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    **sampling,
                    max_new_tokens=max_new_tokens or self.spec.max_new_tokens,
                    logits_processor=[xgr.contrib.hf.LogitsProcessor(grammar)] if grammar is not None else [],
                    eos_token_id=self.stop_token_ids,
                    pad_token_id=self.tokenizer.pad_token_id or self.stop_token_ids[0],
                    streamer=streamer,
                )
        prompt_len = inputs["input_ids"].shape[1]
        new = out[0, prompt_len:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return PlannerOutput(text=text, num_tokens=int(new.shape[0]), prompt_tokens=prompt_len)
