"""LangChain's standard chat-model suites (langchain-tests 1.1.9) on the embedded model.

Features the model does not have are declared through the suite's flags (the suite then skips
those tests); nothing is xfailed:

* tool calling, tool choice, structured output, JSON mode: no tool-call or JSON-schema
  decoding in the engine (a 135M model would not follow schemas reliably either);
* image, audio, video, PDF inputs, Anthropic-format inputs: the engine reads text only;
* per-call model override: one adapter serves one loaded model (``model=`` naming another
  model raises `InvalidInputError`), and only one model is installed offline;
* VCR timing tests: there is no HTTP traffic to record.

``cache_read_input`` usage details are declared and exercised with a corpus over one cache page.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.prompts import ChatPromptTemplate
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from reattention_integrations.langchain import ChatReAttention
from tests.integrations.corpus import QUESTIONS, SYSTEM_TEMPLATE, TEST_PAGE_SIZE, joined

# Short answers keep the suite fast on CPU; every standard check still sees real text.
PARAMS = {"max_tokens": 4}


class _Flags:
    @property
    def chat_model_class(self) -> type[ChatReAttention]:
        return ChatReAttention

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}


class TestChatReAttentionUnit(_Flags, ChatModelUnitTests):
    """Construction, standard params and init time: no model is loaded."""

    @property
    def chat_model_params(self) -> dict:
        return {}  # the suite passes max_tokens itself


@pytest.mark.usefixtures("shared_embedded_engine")
class TestChatReAttentionIntegration(_Flags, ChatModelIntegrationTests):
    """Every generation test of the suite, on the embedded SmolLM2-135M-Instruct."""

    @property
    def chat_model_params(self) -> dict:
        return dict(PARAMS)

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """Ask about the shared corpus twice; the second call must read the corpus from the cache."""
        model = ChatReAttention(**PARAMS)
        prompt = ChatPromptTemplate.from_messages([("system", SYSTEM_TEMPLATE), ("human", "{question}")])
        messages = [prompt.invoke({"docs": joined(), "question": q}).to_messages() for q, _ in QUESTIONS]
        model.invoke(messages[0])  # cold, unless another test already cached the corpus
        if stream:
            full: AIMessageChunk | None = None
            for chunk in model.stream(messages[1]):
                full = chunk if full is None else full + chunk
            assert full is not None
            message: AIMessage = full
        else:
            message = model.invoke(messages[1])
        assert message.usage_metadata is not None
        details = message.usage_metadata.get("input_token_details") or {}
        assert details.get("cache_read", 0) >= 2 * TEST_PAGE_SIZE, message.usage_metadata
        return message
