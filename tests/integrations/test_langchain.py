"""LangChain adapters: messages, options, streaming, async without blocking, concurrency, errors.

Plumbing tests run on a tiny random-init model (fast; its text is noise); tests of text and of
the prefix cache run on the embedded model.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import LLMResult
from langchain_core.prompts import ChatPromptTemplate
from pydantic import ValidationError

from reattention_core import ConfigError, InvalidInputError, ModelNotFoundError, ReAttentionEngine
from reattention_integrations import UnsupportedMessageError
from reattention_integrations.langchain import ChatReAttention, ReAttentionLLM, to_chat_messages
from tests.integrations.corpus import QUESTIONS, SYSTEM_TEMPLATE, TEST_PAGE_SIZE, joined


class _Recorder(BaseCallbackHandler):
    """Records streamed tokens and the final LLM results of a run."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.results: list[LLMResult] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: LLMResult, **kwargs) -> None:
        self.results.append(response)


def _forward_probe(engine: ReAttentionEngine, counter: list[int]) -> tuple[list[int], object]:
    """Record ``counter[0]`` (bumped by a coroutine on the event loop) at every model forward."""
    seen: list[int] = []
    handle = engine.model.register_forward_hook(lambda *_: seen.append(counter[0]))
    return seen, handle


# -- messages ----------------------------------------------------------------------------------------


def test_messages_map_to_roles():
    messages = [
        SystemMessage("rules"),
        HumanMessage("hi", name="ann"),
        AIMessage("hello"),
        ChatMessage(role="user", content=[{"type": "text", "text": "a"}, "b"]),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "ab"},
    ]


@pytest.mark.parametrize(
    "message, hint",
    [
        (ToolMessage("42", tool_call_id="c1"), "ToolMessage"),
        (AIMessage("", tool_calls=[{"name": "add", "args": {}, "id": "c1"}]), "tool calls"),
        (HumanMessage([{"type": "image", "url": "https://x/y.png"}]), "'image'"),
        (ChatMessage(role="critic", content="meh"), "ChatMessage"),
    ],
)
def test_unrepresentable_messages_raise_typed_errors(message, hint):
    with pytest.raises(UnsupportedMessageError, match=hint) as info:
        to_chat_messages([HumanMessage("q"), message])
    assert "message 1" in str(info.value)
    assert isinstance(info.value, InvalidInputError)


# -- construction --------------------------------------------------------------------------------------


def test_construction_is_lazy_and_loading_errors_are_typed(tmp_path):
    model = ChatReAttention(model=str(tmp_path / "missing"))  # nothing is loaded yet
    assert model.model_name == str(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="missing"):
        model.invoke("hi")


def test_bad_settings_raise_at_construction():
    with pytest.raises(ConfigError, match="unknown ReAttentionConfig keys"):
        ChatReAttention(config={"sink": 4})
    with pytest.raises(ConfigError, match="dtype"):
        ChatReAttention(dtype="int8")
    with pytest.raises(ValidationError):
        ChatReAttention(temprature=0.5)  # typo: an error, not a silently ignored field
    with pytest.raises(ValidationError):
        ReAttentionLLM(top_p=0)


# -- generation plumbing (tiny model) -----------------------------------------------------------------------


def test_stream_matches_invoke_with_usage_on_the_last_chunk(tiny_engine):
    model = ChatReAttention(engine=tiny_engine, max_tokens=12)
    recorder = _Recorder()
    full = None
    chunks = list(model.stream("Hello", config={"callbacks": [recorder]}))
    for chunk in chunks:
        full = chunk if full is None else full + chunk
    invoked = model.invoke("Hello")
    assert full.content == invoked.content and len(invoked.content) > 0
    assert "".join(recorder.tokens) == invoked.content  # one callback per streamed piece
    assert chunks[-1].chunk_position == "last"
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1
    usage = full.usage_metadata
    prompt_tokens = len(tiny_engine.encode([{"role": "user", "content": "Hello"}]))
    assert usage["input_tokens"] == prompt_tokens == invoked.usage_metadata["input_tokens"]
    assert usage["output_tokens"] == 12 and usage["total_tokens"] == prompt_tokens + 12
    assert usage["input_token_details"] == {"cache_read": 0}
    assert full.response_metadata == {"model_name": tiny_engine.model_name, "finish_reason": "length"}


def test_call_options_override_fields_and_unknown_ones_raise(tiny_engine):
    model = ChatReAttention(engine=tiny_engine, max_tokens=12)
    assert model.invoke("Hello", max_tokens=3).usage_metadata["output_tokens"] == 3
    sampled = [model.invoke("Hello", temperature=1.0, seed=7).content for _ in range(2)]
    assert sampled[0] == sampled[1]
    with pytest.raises(InvalidInputError, match="unknown option 'max_new_tokens'"):
        model.invoke("Hello", max_new_tokens=3)
    with pytest.raises(InvalidInputError, match="cannot switch to model='other'"):
        model.invoke("Hello", model="other")
    with pytest.raises(InvalidInputError, match="temperature"):
        model.invoke("Hello", temperature=-1.0)


def test_context_option_puts_the_corpus_first(tiny_engine):
    model = ChatReAttention(engine=tiny_engine, max_tokens=2)
    usage = model.invoke([SystemMessage("sys"), HumanMessage("q?")], context="CORPUS").usage_metadata
    expected = tiny_engine.encode([{"role": "system", "content": "sys"}, {"role": "user", "content": "CORPUS\n\nq?"}])
    assert usage["input_tokens"] == len(expected)


def test_concurrent_batches_equal_sequential_calls(tiny_engine):
    model = ChatReAttention(engine=tiny_engine, max_tokens=8)
    prompts = ["alpha", "beta", "gamma", "delta"]
    sequential = [model.invoke(p).content for p in prompts]
    assert [m.content for m in model.batch(prompts, config={"max_concurrency": 4})] == sequential
    assert [m.content for m in asyncio.run(model.abatch(prompts))] == sequential
    llm = ReAttentionLLM(engine=tiny_engine, max_tokens=8)
    assert llm.batch(prompts, config={"max_concurrency": 4}) == sequential
    assert asyncio.run(llm.abatch(prompts)) == sequential


@pytest.mark.parametrize("method", ["ainvoke", "astream", "llm_ainvoke", "llm_astream"])
def test_async_calls_never_block_the_event_loop(tiny_engine, method):
    chat = ChatReAttention(engine=tiny_engine, max_tokens=24)
    llm = ReAttentionLLM(engine=tiny_engine, max_tokens=24)
    counter = [0]

    async def tick(stop: asyncio.Event) -> None:
        while not stop.is_set():
            counter[0] += 1
            await asyncio.sleep(0)

    async def call() -> str:
        if method == "ainvoke":
            return (await chat.ainvoke("Hello")).content
        if method == "llm_ainvoke":
            return await llm.ainvoke("Hello")
        runnable = chat if method == "astream" else llm
        pieces = [c.content if method == "astream" else c async for c in runnable.astream("Hello")]
        return "".join(pieces)

    async def main() -> str:
        stop = asyncio.Event()
        ticker = asyncio.create_task(tick(stop))
        try:
            return await call()
        finally:
            stop.set()
            await ticker

    seen, handle = _forward_probe(tiny_engine, counter)
    try:
        text = asyncio.run(main())
    finally:
        handle.remove()
    assert text == chat.invoke("Hello").content
    # The loop kept running while the model computed: forwards saw the ticker advance.
    assert len(seen) >= 24 and seen[-1] > seen[0], seen


def test_abandoned_streams_release_the_engine(tiny_engine):
    model = ChatReAttention(engine=tiny_engine, max_tokens=24)
    for _chunk in model.stream("Hello"):
        break  # closes the generator in this thread

    async def first_piece() -> str:
        async for chunk in model.astream("Hello"):
            return chunk.content
        return ""

    asyncio.run(first_piece())
    done = []
    worker = threading.Thread(target=lambda: done.append(model.invoke("Hello", max_tokens=2)))
    worker.start()
    worker.join(60)
    assert done, "the engine lock was left held by an abandoned stream"


def test_text_llm_uses_the_chat_template_unless_told_not_to(tiny_engine):
    chat_llm = ReAttentionLLM(engine=tiny_engine, max_tokens=4)
    raw_llm = ReAttentionLLM(engine=tiny_engine, max_tokens=4, chat_template=False)
    chat_info = chat_llm.generate(["Hello"]).generations[0][0].generation_info
    raw_info = raw_llm.generate(["Hello"]).generations[0][0].generation_info
    assert chat_info["prompt_tokens"] == len(tiny_engine.encode([{"role": "user", "content": "Hello"}]))
    assert raw_info["prompt_tokens"] == len(tiny_engine.encode("Hello"))
    assert "".join(chat_llm.stream("Hello")) == chat_llm.invoke("Hello")


def test_importing_the_package_imports_no_framework_and_missing_ones_say_what_to_install():
    import subprocess
    import sys

    code = (
        "import sys, reattention_integrations\n"
        "assert 'langchain_core' not in sys.modules and 'llama_index' not in sys.modules\n"
        "for mod, blocked, extra in [('langchain', 'langchain_core', 'langchain'),"
        " ('llama_index', 'llama_index', 'llama-index')]:\n"
        "    sys.modules[blocked] = None\n"
        "    try:\n"
        "        __import__('reattention_integrations.' + mod)\n"
        "    except ImportError as exc:\n"
        "        assert f'pip install \"reattention[{extra}]\"' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError(mod + ' imported without its framework')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the embedded model ---------------------------------------------------------------------------------


def test_stop_strings_from_field_and_call_are_merged(shared_embedded_engine):
    chat = [HumanMessage("Hello")]
    full = ChatReAttention(max_tokens=10).invoke(chat).content  # "Hello! How can I assist you today?"
    assert "How" in full and "can" in full
    stopped = ChatReAttention(max_tokens=10, stop=["can"]).invoke(chat, stop=["How"])
    assert stopped.content == full[: full.index("How")]
    assert stopped.response_metadata["finish_reason"] == "stop"


def test_lcel_chain_over_documents_reuses_the_cached_corpus(shared_embedded_engine):
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM_TEMPLATE), ("human", "{question}")])
    chain = prompt | ChatReAttention(max_tokens=16) | StrOutputParser()
    recorder = _Recorder()
    answers = [chain.invoke({"docs": joined(), "question": q}, config={"callbacks": [recorder]}) for q, _ in QUESTIONS]
    for answer, (_, expected) in zip(answers, QUESTIONS, strict=True):
        assert expected.lower() in answer.lower(), answers
    usage = [r.generations[0][0].message.usage_metadata for r in recorder.results]
    # The second question prefilled only what follows the cached page(s) of the corpus.
    cached = usage[1]["input_token_details"]["cache_read"]
    assert cached >= 2 * TEST_PAGE_SIZE
    assert usage[1]["input_tokens"] - cached < TEST_PAGE_SIZE + 48  # < a page of corpus + the question
