"""The planner as a LangChain chat model, so LangGraph's ``messages`` stream mode sees its tokens.

Messages are langchain-core messages whose image content blocks name images in the store
(``{"type": "image", "file_id": <sha256>}``); pixels are loaded here, inside the model call, and
never enter graph state. Each image is preceded by a short label (``[image 1a2b3c4d5e6f]``) so the
planner can reference it by id. Pass the decoding grammar as the ``schema`` keyword:

>>> chat = PlannerChatModel(planner=planner, store=store)      # doctest: +SKIP
>>> chat.invoke(messages, schema=check_schema()).content        # doctest: +SKIP
'{"verdict": "ok", "note": "matches"}'
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, PrivateAttr

from duogen_agents.document import SHORT_ID_LENGTH
from duogen_agents.models.protocols import ChatTurn, Planner

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def image_label(image_id: str) -> str:
    return f"[image {image_id[:SHORT_ID_LENGTH]}]"


def to_chat_turns(messages: list[BaseMessage], load_image: Any) -> list[ChatTurn]:
    """Convert langchain messages to the planner's turns, resolving image blocks through ``load_image``."""
    turns: list[ChatTurn] = []
    for m in messages:
        role = _ROLES.get(m.type, "user")
        parts: list[Any] = []
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        for block in blocks:
            if isinstance(block, str):
                parts.append({"type": "text", "text": block})
            elif block.get("type") == "text":
                parts.append({"type": "text", "text": block["text"]})
            elif block.get("type") == "image" and block.get("file_id"):
                parts.append({"type": "text", "text": image_label(block["file_id"])})
                parts.append({"type": "image", "image": load_image(block["file_id"])})
        if turns and turns[-1]["role"] == role and role == "system":
            turns[-1]["content"].extend(parts)
        else:
            turns.append({"role": role, "content": parts})  # type: ignore[typeddict-item]
    return turns


class PlannerChatModel(BaseChatModel):
    """A ``BaseChatModel`` over a local ``Planner`` and the image store."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    planner: Any
    store: Any
    # Decoded history images by id. Ids are content hashes, so an entry can never go stale; without
    # this every planner call of a turn would decode every earlier PNG again.
    _decoded: OrderedDict[str, Any] = PrivateAttr(default_factory=OrderedDict)

    def _load_image(self, image_id: str) -> Any:
        if image_id in self._decoded:
            self._decoded.move_to_end(image_id)
            return self._decoded[image_id]
        image = self.store.open(image_id)
        self._decoded[image_id] = image
        if len(self._decoded) > 64:
            self._decoded.popitem(last=False)
        return image

    @property
    def _llm_type(self) -> str:
        return "duogen-planner"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        schema = kwargs.pop("schema", None)
        if schema is None:
            raise ValueError("PlannerChatModel needs a JSON schema: invoke(messages, schema=...)")
        planner: Planner = self.planner

        def on_token(token: str) -> None:
            if run_manager is not None:
                run_manager.on_llm_new_token(token, chunk=ChatGenerationChunk(message=AIMessageChunk(content=token)))

        out = planner.generate(
            to_chat_turns(messages, self._load_image),
            schema,
            max_new_tokens=kwargs.get("max_new_tokens"),
            seed=kwargs.get("seed"),
            on_token=on_token,
        )
        usage = {
            "input_tokens": out.prompt_tokens,
            "output_tokens": out.num_tokens,
            "total_tokens": out.prompt_tokens + out.num_tokens,
        }
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=out.text, usage_metadata=usage))])
