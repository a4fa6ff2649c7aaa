"""``ChatDuogen`` against langchain-tests' standard suites (unit and integration) and the behaviour other
code relies on, on the tiny preset (real models, random weights).

- The suites' own skips are right: no API key to read from the environment; loaded weights are not
  serialisable; no PDF, audio, Anthropic-format or VCR-recorded inputs.
- The image test's picture comes from GitHub in the suite; here the same calls get a local PNG, and
  remote image URLs are off by default (``allow_remote_images``; tested with a local server elsewhere).
- Six integration tests check what a competent model answers (the argument 3 read from the prompt,
  an agent loop that stops, Unicode echoed back): random weights cannot, so they are expected to fail
  (``xfail``, not skipped: they run, and a pass would show).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from duogen_agents.models.chat_model import ChatDuogen


@pytest.fixture(scope="module", autouse=True)
def tiny_home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    home = tmp_path_factory.mktemp("chat-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    old = os.environ.get("DUOGEN_TEST_CHAT_HOME")
    os.environ["DUOGEN_TEST_CHAT_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DUOGEN_TEST_CHAT_HOME", None)
    else:
        os.environ["DUOGEN_TEST_CHAT_HOME"] = old


class _Params:
    @property
    def chat_model_class(self) -> type[ChatDuogen]:
        return ChatDuogen

    @property
    def chat_model_params(self) -> dict:
        home = os.environ.get("DUOGEN_TEST_CHAT_HOME")
        return {"preset": "tiny", "default_max_tokens": 24, "seed": 0, "home": home}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def tool_choice_value(self) -> str:
        return "any"

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return False  # remote URLs are fetched only with allow_remote_images (off by default)


class TestChatDuogenUnit(_Params, ChatModelUnitTests):
    pass


RANDOM_WEIGHTS = "random weights: the tiny preset cannot give the answer this test checks for"


@pytest.mark.slow
class TestChatDuogenIntegration(_Params, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def local_image(self, monkeypatch) -> None:
        """The suite downloads its test picture from GitHub; here it gets a local PNG instead."""
        import io
        from types import SimpleNamespace

        import httpx
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, format="PNG")
        monkeypatch.setattr(httpx, "get", lambda url, **kw: SimpleNamespace(content=buf.getvalue()))

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS, strict=False)
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS, strict=False)
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS, strict=False)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=RANDOM_WEIGHTS, strict=False)
    def test_unicode_tool_call_integration(self, model, *args, **kwargs) -> None:
        super().test_unicode_tool_call_integration(model, *args, **kwargs)


@pytest.fixture(scope="module")
def chat(tiny_home):
    return ChatDuogen(preset="tiny", default_max_tokens=24, seed=0, home=str(tiny_home))


def test_free_text_with_usage(chat) -> None:
    message = chat.invoke("Describe a picnic")
    assert isinstance(message.content, str) and message.content
    usage = message.usage_metadata
    assert usage["output_tokens"] <= 24 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert message.response_metadata["model_name"] == "tiny:qwen2_5_vl"


def test_streaming_gives_the_same_text_and_usage_last(chat) -> None:
    chunks = list(chat.stream("Describe a picnic"))
    assert len(chunks) > 2
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == chat.invoke("Describe a picnic").content  # same seed, same text
    assert chunks[-1].usage_metadata and not any(c.usage_metadata for c in chunks[:-1])


def test_max_tokens_per_call_as_langchain_passes_it(chat) -> None:
    """``invoke(..., max_tokens=N)`` and ``bind(max_tokens=N)`` cap the answer, as on other LangChain chat
    models (they were ignored: only the constructor's field counted)."""
    assert chat.invoke("Describe a picnic", max_tokens=3).usage_metadata["output_tokens"] <= 3
    assert chat.bind(max_tokens=2).invoke("Describe a picnic").usage_metadata["output_tokens"] <= 2
    assert chat.invoke("Describe a picnic").usage_metadata["output_tokens"] > 3  # the default cap is 24


def test_stop_sequences_cut_the_text(chat) -> None:
    text = chat.invoke("Describe a picnic").content
    cut = text[len(text) // 2 : len(text) // 2 + 2]
    assert cut and cut not in chat.invoke("Describe a picnic", stop=[cut]).content


def test_structured_output_and_tool_calls_follow_their_schemas(chat) -> None:
    from pydantic import BaseModel

    class Step(BaseModel):
        title: str
        minutes: int

    step = chat.with_structured_output(Step).invoke("One step of a picnic plan")
    assert isinstance(step, Step) and isinstance(step.minutes, int)

    def add(a: int, b: int) -> int:
        """Add two whole numbers."""
        return a + b

    message = chat.bind_tools([add], tool_choice="any").invoke("What is 2 + 3?")
    (call,) = message.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    assert all(isinstance(v, int) for v in call["args"].values())


def test_image_blocks_reach_the_model(chat, monkeypatch) -> None:
    import base64
    import io

    import numpy as np
    from langchain_core.messages import HumanMessage
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (250, 0, 0)).save(buf, format="PNG")
    seen = []
    real = chat.planner.generate

    def spy(conversation, schema, **kw):
        seen.extend(p["image"] for t in conversation for p in t["content"] if p["type"] == "image")
        return real(conversation, schema, **kw)

    monkeypatch.setattr(chat.planner, "generate", spy)
    b64 = base64.b64encode(buf.getvalue()).decode()
    chat.invoke(
        [
            HumanMessage(
                content=[
                    {"type": "image", "base64": b64, "mime_type": "image/png"},
                    {"type": "text", "text": "what colour?"},
                ]
            )
        ]
    )
    (image,) = seen
    assert np.asarray(image)[0, 0].tolist() == [250, 0, 0]
