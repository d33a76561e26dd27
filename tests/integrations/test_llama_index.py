"""LlamaIndex adapter: metadata, every completion/chat form, a real query engine with cache reuse."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core import Document, SummaryIndex
from llama_index.core.base.llms.types import CacheControl, CachePoint, ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from llama_index.core.llms import LLM
from pydantic import Field

from reattention_core import InvalidInputError
from reattention_integrations import UnsupportedMessageError
from reattention_integrations.llama_index import MEMORY_BOUND_CONTEXT_WINDOW, ReAttentionLLM, to_chat_messages
from tests.integrations.corpus import DOCS, QUESTIONS, TEST_PAGE_SIZE


class _ChatEnds(BaseEventHandler):
    """Keeps the response of every chat call (LlamaIndex instrumentation: sync and async paths)."""

    responses: list[Any] = Field(default_factory=list)

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None:
            self.responses.append(event.response)


def test_is_a_llama_index_llm_with_honest_metadata():
    assert LLM in ReAttentionLLM.__mro__
    meta = ReAttentionLLM(max_tokens=64).metadata  # no model load needed
    assert meta.context_window == MEMORY_BOUND_CONTEXT_WINDOW > 8192  # never the 8K pre-training window
    assert meta.num_output == 64 and meta.is_chat_model and not meta.is_function_calling_model
    assert meta.model_name == "SmolLM2-135M-Instruct"
    assert ReAttentionLLM(config={"max_context": 50_000}).metadata.context_window == 50_000


def test_message_mapping_and_typed_errors():
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="rules"),
        ChatMessage(
            role=MessageRole.USER,
            blocks=[
                TextBlock(text="corpus"),
                CachePoint(cache_control=CacheControl(type="ephemeral")),
                TextBlock(text="q"),
            ],
        ),
        ChatMessage(role=MessageRole.MODEL, content="a"),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "corpus\nq"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(UnsupportedMessageError, match="message 1 has role 'tool'"):
        to_chat_messages([messages[1], ChatMessage(role=MessageRole.TOOL, content="42")])
    with pytest.raises(UnsupportedMessageError, match="ImageBlock"):
        to_chat_messages([ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(url="https://x/y.png")])])


def test_every_form_gives_the_same_text_and_usage(tiny_engine):
    llm = ReAttentionLLM(engine=tiny_engine, max_tokens=10)
    chat = [ChatMessage(role=MessageRole.USER, content="Hello")]
    expected = tiny_engine.generate([{"role": "user", "content": "Hello"}], max_new_tokens=10)

    done = llm.complete("Hello")
    assert done.text == expected.text and len(done.text) > 0
    usage = done.raw["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (expected.prompt_tokens, 10)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0} and done.raw["finish_reason"] == "length"
    assert llm.chat(chat).message.content == expected.text

    streamed = list(llm.stream_complete("Hello"))
    assert "".join(r.delta for r in streamed) == streamed[-1].text == expected.text
    assert streamed[-1].raw["usage"] == usage and all(r.raw is None for r in streamed[:-1])
    chats = list(llm.stream_chat(chat))
    assert "".join(r.delta for r in chats) == chats[-1].message.content == expected.text

    async def run_async() -> list[str]:
        texts = [(await llm.acomplete("Hello")).text, (await llm.achat(chat)).message.content]
        texts.append([r async for r in await llm.astream_complete("Hello")][-1].text)
        texts.append([r async for r in await llm.astream_chat(chat)][-1].message.content)
        return texts

    assert asyncio.run(run_async()) == [expected.text] * 4


def test_formatted_prompts_are_sent_verbatim_and_options_are_checked(tiny_engine):
    llm = ReAttentionLLM(engine=tiny_engine, max_tokens=4)
    assert llm.complete("Hello", formatted=True).raw["usage"]["prompt_tokens"] == len(tiny_engine.encode("Hello"))
    assert llm.complete("Hello", max_tokens=2).raw["usage"]["completion_tokens"] == 2
    with pytest.raises(InvalidInputError, match="unknown option 'n'"):
        llm.complete("Hello", n=2)


def test_summary_index_query_engine_puts_the_corpus_in_one_cached_prompt(shared_embedded_engine):
    calls = _ChatEnds()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(calls)
    try:
        index = SummaryIndex.from_documents([Document(text=d) for d in DOCS])
        query_engine = index.as_query_engine(llm=ReAttentionLLM(max_tokens=16))
        first = query_engine.query(QUESTIONS[0][0])
        second = asyncio.run(query_engine.aquery(QUESTIONS[1][0]))  # the async path, in a real pipeline
    finally:
        dispatcher.event_handlers.remove(calls)
    assert QUESTIONS[0][1].lower() in str(first).lower()
    assert QUESTIONS[1][1].lower() in str(second).lower()

    assert len(calls.responses) == 2  # one LLM call per query: the corpus was not split
    usage = [r.raw["usage"] for r in calls.responses]
    corpus_tokens = len(shared_embedded_engine.tokenizer("\n\n".join(DOCS))["input_ids"])
    assert all(u["prompt_tokens"] > corpus_tokens for u in usage)
    # Same documents, another question: the corpus prefix came from the cache.
    assert usage[1]["prompt_tokens_details"]["cached_tokens"] >= 2 * TEST_PAGE_SIZE
