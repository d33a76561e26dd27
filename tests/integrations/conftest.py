"""Fixtures of the adapter tests: the session's embedded model, shared through the registry."""

from __future__ import annotations

import inspect

import pytest

from reattention_core import CacheConfig, ReAttentionEngine
from tests.integrations.corpus import TEST_PAGE_SIZE


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """Run ``async def`` tests (langchain-tests' async suite) under pytest-asyncio.

    The repository runs pytest-asyncio in strict mode, where an unmarked coroutine test fails;
    the standard suites' async tests carry no mark and must not be overridden.
    """
    if inspect.iscoroutinefunction(obj) and collector.funcnamefilter(name):
        pytest.mark.asyncio(obj)


@pytest.fixture(scope="session")
def shared_embedded_engine(embedded_engine: ReAttentionEngine) -> ReAttentionEngine:
    """The session's embedded model as the shared engine of the default adapter settings.

    Every adapter created with default settings (``ChatReAttention()``, ``ReAttentionLLM()``) then
    uses it, so the model loads once per test session however many adapters the tests build. It
    wraps the model of ``embedded_engine`` (no second copy) with `TEST_PAGE_SIZE` pages; the two
    engines must not run at the same time (each has its own lock), and tests run one at a time.
    """
    from reattention_integrations import EngineSettings, register_engine

    engine = ReAttentionEngine(
        embedded_engine.model,
        embedded_engine.tokenizer,
        embedded_engine.config,
        model_name=embedded_engine.model_name,
        cache=CacheConfig(page_size=TEST_PAGE_SIZE),
    )
    shared = register_engine(EngineSettings.create(), engine)
    assert shared is engine, "an adapter loaded its own embedded engine before this fixture ran"
    return engine


@pytest.fixture(scope="session")
def tiny_engine() -> ReAttentionEngine:
    """A random-init 2-layer Llama with a byte tokenizer: fast, for tests of plumbing, not of text."""
    from tests.helpers import ByteTokenizer, tiny_model

    return ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), cache=False)
