"""Prefix cache in memory: warm runs are bit-identical to cold ones, the corpus is never modified,
several corpora coexist, the chat layout keeps the context a stable prefix."""

from __future__ import annotations

import pytest
import torch

import reattention_core.generation.loop as loop_mod
from reattention_core import (
    CacheConfig,
    CacheError,
    ConfigError,
    ReAttentionCache,
    ReAttentionConfig,
    ReAttentionEngine,
    ResidentStore,
    enable_reattention,
)
from reattention_core.cache.chain import cacheable_pages, page_keys
from reattention_core.cache.config import default_page_size
from reattention_core.generation.prefill import plan_prefill, run_prefill
from tests.helpers import ByteTokenizer, random_ids, tiny_model, word_text

CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=4, local_window=32, prefill_chunk_size=16)
PAGE = 64


def make_engine(arch: str = "llama", *, seed: int = 0, cache: CacheConfig | bool | None = None, model=None):
    if cache is None:
        cache = CacheConfig(page_size=PAGE, disk=False)
    return ReAttentionEngine(
        model if model is not None else tiny_model(arch, seed=seed), ByteTokenizer(), CFG, cache=cache
    )


class LogitsSpy:
    """Records the prompt logits `run_prefill` returns inside the engine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.logits: list[torch.Tensor] = []
        real = loop_mod.run_prefill

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            if out is not None:
                self.logits.append(out.clone())
            return out

        monkeypatch.setattr(loop_mod, "run_prefill", spy)


def test_page_keys_form_a_hash_chain():
    ids = list(range(300))
    a = page_keys("00" * 32, ids, 64, 4)
    assert len(a) == 4 and len(set(a)) == 4
    assert page_keys("00" * 32, ids[:128] + [7] * 172, 64, 4)[:2] == a[:2]
    changed = ids.copy()
    changed[3] = 999
    assert all(x != y for x, y in zip(page_keys("00" * 32, changed, 64, 4), a, strict=True)), (
        "a change in page 0 renames every page"
    )
    assert page_keys("11" * 32, ids, 64, 4)[0] != a[0], "the fingerprint is the root"


def test_only_pages_before_the_lone_last_token_are_cacheable():
    assert [cacheable_pages(n, 64) for n in (1, 64, 65, 128, 129, 200)] == [0, 0, 1, 1, 2, 3]


def test_page_size_defaults_and_validation():
    assert default_page_size(256) == 1024 and default_page_size(512) == 1024 and default_page_size(1000) == 2000
    assert CacheConfig().page_size_for(CFG) == 1024
    with pytest.raises(ConfigError, match="multiple of prefill_chunk_size"):
        ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), CFG, cache=CacheConfig(page_size=40))
    with pytest.raises(ConfigError, match="positive int"):
        CacheConfig(page_size=0)


def test_resuming_prefill_at_a_page_boundary_is_bit_identical(tiny_arch):
    model = tiny_model(tiny_arch)
    ids = random_ids(301, seed=3)
    with enable_reattention(model, CFG):
        cold = ResidentStore(2)
        logits_cold = run_prefill(model, ids, ReAttentionCache(cold), 16)
        warm = ResidentStore(2)
        for layer in range(2):
            k, v = cold.view(layer)
            warm.append(layer, k[:, :256].clone(), v[:, :256].clone())
        logits_warm = run_prefill(model, ids, ReAttentionCache(warm), 16, start=256)
    assert torch.equal(logits_cold, logits_warm)
    for layer in range(2):
        assert torch.equal(cold.view(layer)[0], warm.view(layer)[0])
    with pytest.raises(ValueError, match="chunk boundary"):
        run_prefill(model, ids, ReAttentionCache(ResidentStore(2)), 16, start=250)


@pytest.mark.parametrize("length", [PAGE * 5 + 1, PAGE * 5, PAGE * 5 + 37])
def test_warm_generation_equals_cold_bit_for_bit(tiny_arch, length, monkeypatch):
    spy = LogitsSpy(monkeypatch)
    model = tiny_model(tiny_arch)
    prompt = word_text(length, seed=1)
    cold = make_engine(model=model, cache=False).generate(prompt, max_new_tokens=6)
    engine = make_engine(model=model)
    first = engine.generate(prompt, max_new_tokens=6)
    warm = engine.generate(prompt, max_new_tokens=6)
    assert first.cached_tokens == 0
    assert warm.cached_tokens == cacheable_pages(length, PAGE) * PAGE
    assert cold.token_ids == first.token_ids == warm.token_ids
    assert torch.equal(spy.logits[0], spy.logits[1]) and torch.equal(spy.logits[0], spy.logits[2])


def test_questions_never_modify_the_cached_corpus(monkeypatch):
    spy = LogitsSpy(monkeypatch)
    model = tiny_model("qwen2")
    corpus = word_text(400, seed=2)
    engine = make_engine(model=model)
    engine.generate("first question?", context=corpus, max_new_tokens=12)
    seg = engine._prefix.memory._segments[0]
    snapshot = [tuple(t.clone() for t in seg.store.view(layer)) for layer in range(2)]
    b = len(engine.prompts.context_prefix_ids(corpus))  # the corpus is cached to its last token
    for q in ("a much longer second question " * 6, "third?"):
        res = engine.generate(q, context=corpus, max_new_tokens=12, temperature=1.0, seed=5)
        assert res.cached_tokens == b
    seg = engine._prefix.memory._segments[0]
    for layer in range(2):
        k, v = seg.store.view(layer)
        assert k.shape[1] == b
        assert torch.equal(k, snapshot[layer][0]) and torch.equal(v, snapshot[layer][1])
    spy.logits.clear()
    warm = engine.generate("first question?", context=corpus, max_new_tokens=12)
    cold = make_engine(model=model, cache=False).generate("first question?", context=corpus, max_new_tokens=12)
    assert warm.token_ids == cold.token_ids and torch.equal(spy.logits[0], spy.logits[1])


def test_several_corpora_stay_cached_and_a_shared_preamble_is_copied_not_lost():
    model = tiny_model("llama")
    engine = make_engine(model=model)
    preamble = word_text(PAGE, seed=9)  # exactly one page shared by both corpora
    a, b = preamble + word_text(300, seed=10), preamble + word_text(300, seed=11)
    assert engine.generate(a, max_new_tokens=2).cached_tokens == 0
    assert engine.generate(b, max_new_tokens=2).cached_tokens == PAGE  # preamble copied from a's store
    ra = engine.generate(a, max_new_tokens=4)
    rb = engine.generate(b, max_new_tokens=4)
    assert ra.cached_tokens == rb.cached_tokens == 5 * PAGE
    cold = make_engine(model=model, cache=False)
    assert ra.token_ids == cold.generate(a, max_new_tokens=4).token_ids
    assert rb.token_ids == cold.generate(b, max_new_tokens=4).token_ids
    info = engine.cache_info()
    assert info.memory.entries == 2 and info.memory.tokens == 10 * PAGE and info.memory.bytes > 0
    assert info.disk is None


def test_memory_cap_evicts_the_least_recently_used_corpus():
    one = 2 * 2 * 2 * 16 * 4 * (5 * PAGE + 2 * PAGE + 8)  # layers x (k, v) x heads x dim x fp32 x capacity
    engine = make_engine(cache=CacheConfig(page_size=PAGE, disk=False, memory_bytes=int(one * 1.5)))
    a, b = word_text(330, seed=20), word_text(330, seed=21)
    engine.generate(a, max_new_tokens=2)
    engine.generate(b, max_new_tokens=2)
    assert engine.cache_info().memory.entries == 1
    assert engine.generate(b, max_new_tokens=2).cached_tokens == 5 * PAGE
    assert engine.generate(a, max_new_tokens=2).cached_tokens == 0


def test_prefill_warms_the_context_and_reports_cached_tokens():
    model = tiny_model("mistral")
    engine = make_engine(model=model)
    corpus = word_text(500, seed=4)
    first = engine.prefill(context=corpus, progress=False)
    assert first.prompt_tokens == len(engine.prompts.context_prefix_ids(corpus))
    assert first.stored_tokens == first.prompt_tokens and first.prefilled_tokens == first.stored_tokens
    again = engine.prefill(context=corpus, progress=False)
    assert again.cached_tokens == again.stored_tokens and again.prefilled_tokens == 0
    res = engine.generate("What comes after alpha?", context=corpus, max_new_tokens=5)
    assert res.cached_tokens == first.stored_tokens
    cold = make_engine(model=model, cache=False).generate("What comes after alpha?", context=corpus, max_new_tokens=5)
    assert res.token_ids == cold.token_ids


def test_cache_info_and_clear_cache():
    engine = make_engine()
    engine.generate(word_text(300, seed=5), max_new_tokens=2)
    info = engine.cache_info()
    assert (info.entries, info.tokens, info.page_size) == (1, 4 * PAGE, PAGE) and info.bytes > 0
    assert info.as_dict()["memory"]["pages"] == 4
    engine.clear_cache()
    assert engine.cache_info().memory.entries == 0
    assert engine.generate(word_text(300, seed=5), max_new_tokens=2).cached_tokens == 0


def test_cache_off_engine_behaves_as_before():
    engine = make_engine(cache=False)
    prompt = word_text(300, seed=6)
    assert engine.generate(prompt, max_new_tokens=2).cached_tokens == 0
    assert engine.generate(prompt, max_new_tokens=2).cached_tokens == 0
    with pytest.raises(CacheError, match="cache is off"):
        engine.prefill(prompt)
    with pytest.raises(CacheError, match="cache is off"):
        engine.cache_info()


def test_context_goes_first_and_system_messages_stay_before_it():
    engine = make_engine(cache=False)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}]
    ids = engine.encode(msgs, context="DOC")
    assert ByteTokenizer().decode(ids) == "<system>be brief\n<user>DOC\n\nQ?\n<assistant>"
    prefix = engine.prompts.context_prefix_ids("DOC")
    assert engine.encode("other question", context="DOC")[: len(prefix)] == prefix
    with pytest.raises(Exception, match="needs a user message"):
        engine.encode([{"role": "system", "content": "x"}], context="DOC")


def test_embedded_model_chat_context_is_a_stable_prefix(embedded_engine):
    corpus = "The lighthouse keeper counted ships every night. " * 40
    prefix = embedded_engine.prompts.context_prefix_ids(corpus)
    for q in ("Who counted ships?", "What did the keeper count, and when?"):
        ids = embedded_engine.encode(q, context=corpus)
        assert ids[: len(prefix)] == prefix  # the corpus tokens exactly as a question's prompt has them


@pytest.mark.slow
def test_embedded_model_warm_answer_is_identical_to_cold(embedded_engine, monkeypatch, tmp_path):
    spy = LogitsSpy(monkeypatch)
    e = embedded_engine
    cache = CacheConfig(page_size=256, dir=tmp_path)
    warm_engine = ReAttentionEngine(e.model, e.tokenizer, e.config, model_name=e.model_name, cache=cache)
    cold_engine = ReAttentionEngine(e.model, e.tokenizer, e.config, model_name=e.model_name, cache=False)
    corpus = "Mira keeps bees on the hill behind the mill; the hives face east. " * 40
    assert len(e.prompts.context_prefix_ids(corpus)) > 512
    stored = warm_engine.prefill(context=corpus, progress=False).stored_tokens
    assert stored >= 512
    spy.logits.clear()
    q = "Where does Mira keep bees?"
    warm = warm_engine.generate(q, context=corpus, max_new_tokens=8)
    cold = cold_engine.generate(q, context=corpus, max_new_tokens=8)
    assert warm.cached_tokens == stored
    assert warm.token_ids == cold.token_ids
    assert torch.equal(spy.logits[0], spy.logits[1])
    fresh = ReAttentionEngine(e.model, e.tokenizer, e.config, model_name=e.model_name, cache=cache)
    assert fresh.generate(q, context=corpus, max_new_tokens=8).token_ids == cold.token_ids  # from disk


def test_plan_prefill_breaks_the_chunk_grid_at_a_corpus_boundary():
    assert plan_prefill(10, 4, breaks=[6]) == [(0, 4), (4, 6), (6, 9), (9, 10)]
    assert plan_prefill(10, 4, breaks=[9]) == plan_prefill(10, 4) == [(0, 4), (4, 8), (8, 9), (9, 10)]
    assert plan_prefill(8, 4, last_alone=False, breaks=[8]) == [(0, 4), (4, 8)]
    for n, b in [(100, 37), (100, 64), (100, 99), (100, 1)]:
        plan = plan_prefill(n, 16, breaks=[b])
        assert b in {s for s, _ in plan} and plan[0][0] == 0 and plan[-1] == (n - 1, n)
        assert all(0 < e - s <= 16 for s, e in plan)
        assert all(plan[i][1] == plan[i + 1][0] for i in range(len(plan) - 1))
        # before the boundary the grid is the plain one: a corpus warmed alone is chunked the same
        assert [c for c in plan if c[1] <= b] == plan_prefill(b, 16, last_alone=False)


def test_tail_page_key_differs_from_a_whole_page_and_follows_its_tokens():
    root, ids = "00" * 32, list(range(3, 203))
    keys = page_keys(root, ids, 64, 2, tail_end=150)
    assert len(keys) == 3 and keys[:2] == page_keys(root, ids, 64, 2)
    assert keys[2] not in page_keys(root, ids, 64, 3)
    assert page_keys(root, ids[:149] + [7] + ids[150:], 64, 2, tail_end=150)[2] != keys[2]
    assert page_keys(root, ids, 64, 2, tail_end=149)[2] != keys[2]
    assert page_keys(root, ids, 64, 2, tail_end=128) == keys[:2]  # a boundary on a page end: no tail page
    with pytest.raises(ValueError, match="not inside page 2"):
        page_keys(root, ids, 64, 2, tail_end=192)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_question_over_a_cached_corpus_prefills_only_itself(arch, monkeypatch):
    spy = LogitsSpy(monkeypatch)
    model = tiny_model(arch)
    corpus = word_text(450, seed=12)
    engine = make_engine(model=model)
    b = len(engine.prompts.context_prefix_ids(corpus))
    assert b % PAGE and b % CFG.prefill_chunk_size  # the corpus ends inside a page and inside a chunk
    assert engine.generate("Which word comes first?", context=corpus, max_new_tokens=6).cached_tokens == 0
    cold_engine = make_engine(model=model, cache=False)
    for q in ("Which word comes first?", "and which one comes last, after all the others?"):
        warm = engine.generate(q, context=corpus, max_new_tokens=6)
        assert warm.cached_tokens == b and warm.prompt_tokens - b == len(q) + len("\n<assistant>")
        cold = cold_engine.generate(q, context=corpus, max_new_tokens=6)
        assert warm.token_ids == cold.token_ids and torch.equal(spy.logits[-2], spy.logits[-1])
    info = engine.cache_info().memory
    assert (info.entries, info.pages, info.tokens) == (1, b // PAGE + 1, b)
    # a plain prompt with the same text shares the whole pages only (its chunks run past the boundary)
    plain = engine.generate(engine.tokenizer.decode(list(engine.encode("x?", context=corpus))), max_new_tokens=2)
    assert plain.cached_tokens == b // PAGE * PAGE
