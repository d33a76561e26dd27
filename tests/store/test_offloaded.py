"""Selection over an offloaded middle: per-block key bounds, candidate blocks, exact refinement."""

from __future__ import annotations

import pytest
import torch

from reattention_core import OffloadConfig, ReAttentionConfig, ReAttentionEngine
from reattention_core.errors import InvalidInputError
from reattention_core.generation.prefill import run_prefill
from reattention_core.hf import ReAttentionCache, enable_reattention
from reattention_core.store.bounds import KeyBounds, candidate_topk
from reattention_core.store.offloaded import OffloadedStore
from reattention_kernels.reference import score_topk_ref
from tests.helpers import ByteTokenizer, random_ids, tiny_model


def keys_and_queries(kind: str, b: int, m: int, h: int, g: int, tq: int, d: int, seed: int):
    torch.manual_seed(seed)
    k = torch.randn(b, m, h, d)
    q = torch.randn(b, tq, h * g, d)
    if kind == "int":  # small integers: exact ties everywhere
        k, q = k.mul(1.2).round().clamp(-2, 2), q.mul(1.2).round().clamp(-2, 2)
    elif kind == "dup":  # repeated keys (repeated tokens in layer 0)
        src, dst = torch.randint(0, m, (m // 3,)), torch.randint(0, m, (m // 3,))
        k[:, dst] = k[:, src]
    elif kind == "needle":  # one block much closer to the queries than the rest
        k[:, m // 2] = q[:, 0, ::g].mul(3)
    return k, q


def test_bounds_bound_every_score_and_grow_in_any_chunking():
    k, q = keys_and_queries("randn", 2, 203, 3, 3, 5, 16, seed=0)
    whole = KeyBounds.of(k, 16)
    parts = KeyBounds(16, "cpu")
    for a, z in ((0, 7), (7, 40), (40, 41), (41, 203)):
        parts.append(k[:, a:z])
    assert parts.tokens == whole.tokens == 203 and parts.num_blocks == 13
    assert torch.equal(parts.kmin, whole.kmin) and torch.equal(parts.kmax, whole.kmax)
    ub, margin = whole.upper_bounds(q), whole.rounding_margins(q)
    scores = torch.einsum("bthd,bmhd->bthm", q.view(2, 5, 3, 3, 16).flatten(2, 3), k.repeat_interleave(3, 2))
    for n in range(13):
        assert (scores[..., n * 16 : (n + 1) * 16].amax(-1) <= ub[..., n] + margin[..., n]).all()


@pytest.mark.parametrize("kind", ["randn", "int", "dup", "needle"])
@pytest.mark.parametrize("budget", [1, 3, 100])
def test_refined_candidates_give_exactly_the_full_top_k(kind, budget):
    for seed in range(3):
        k, q = keys_and_queries(kind, 2, 397, 3, 3, 4, 16, seed)
        bounds = KeyBounds.of(k, 32)
        res = candidate_topk(q, k, bounds, 4, budget=budget)
        assert torch.equal(res.hits, score_topk_ref(q, k, 4)), (kind, budget, seed)
        assert budget <= res.fetched <= bounds.num_blocks or res.fetched == bounds.num_blocks


def test_a_needle_is_found_reading_few_blocks():
    """The bounds are loose for random keys (a block's bound is a sum of per-dimension extremes), so
    they only rule blocks out when the k-th hit stands far above the crowd, as a needle does."""
    k, q = keys_and_queries("needle", 1, 4096, 1, 1, 1, 64, seed=1)
    bounds = KeyBounds.of(k, 64)
    res = candidate_topk(q, k, bounds, 1, budget=2)
    assert torch.equal(res.hits, score_topk_ref(q, k, 1)) and int(res.hits) == 2048
    assert res.fetched == 2 and res.rounds == 1  # no other block could hold a better key


def test_unrefined_candidates_equal_the_resident_result_when_they_cover_every_block():
    k, q = keys_and_queries("dup", 1, 300, 2, 2, 3, 16, seed=2)
    bounds = KeyBounds.of(k, 16)
    full = candidate_topk(q, k, bounds, 5, budget=bounds.num_blocks, refine=False)
    assert full.rounds == 1 and full.fetched == bounds.num_blocks
    assert torch.equal(full.hits, score_topk_ref(q, k, 5))
    few = candidate_topk(q, k, bounds, 5, budget=2, refine=False)
    assert few.rounds == 1 and few.fetched == 2  # an approximation: only what the budget reads


def test_bad_inputs_are_refused():
    k, q = keys_and_queries("randn", 1, 50, 1, 1, 1, 8, seed=3)
    bounds = KeyBounds.of(k[:, :40], 8)
    with pytest.raises(ValueError, match="cover 40 tokens"):
        candidate_topk(q, k, bounds, 2, budget=1)
    with pytest.raises(ValueError, match="budget"):
        candidate_topk(q, k[:, :40], bounds, 2, budget=0)
    with pytest.raises(ValueError, match="block"):
        KeyBounds(0, "cpu")


# -- the engine with an offloaded store ------------------------------------------------------------

CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=6, local_window=32, prefill_chunk_size=16)


def _logits(engine: ReAttentionEngine, ids: list[int]) -> tuple[torch.Tensor, object]:
    store = engine._runner.fresh_store(len(ids) + 1)
    with enable_reattention(engine.model, engine.config, backend=engine.backend):
        cache = ReAttentionCache(store)
        ids_t = torch.tensor([ids], device=engine.device)
        return run_prefill(engine.model, ids_t, cache, engine.config.prefill_chunk_size), store


def _engines(model, cfg, **offload) -> tuple[ReAttentionEngine, ReAttentionEngine]:
    """A resident engine and an offloaded one (exact, unpinned unless ``offload`` says otherwise) on ``model``."""
    off = OffloadConfig(**{"block": 8, "budget": 2, "refine": True, "pin": False, **offload})
    return (
        ReAttentionEngine(model, ByteTokenizer(), cfg, cache=False),
        ReAttentionEngine(model, ByteTokenizer(), cfg, cache=False, offload=off),
    )


@pytest.mark.parametrize("keys", ["host", "device"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["reattention", "streaming", "full"])
def test_an_offloaded_engine_computes_exactly_what_the_resident_one_does(arch, mode, keys):
    model = tiny_model(arch)
    cfg = CFG.replace(mode=mode)
    resident, offloaded = _engines(model, cfg, keys=keys)
    ids = random_ids(300, seed=3)[0].tolist()
    (got, store), (want, _) = _logits(offloaded, ids), _logits(resident, ids)
    assert torch.equal(got, want)  # prefill, bit for bit
    if keys == "host":
        assert store.bounds[0].tokens == 300 and (store.fetched_blocks > 0) == (mode == "reattention")
    else:  # no bounds: the keys are where the selection runs
        assert store.bounds == [] and store.fetched_blocks == 0
    prompt = "the quick brown fox jumps over the lazy dog. " * 8
    assert (
        offloaded.generate(prompt, max_new_tokens=8).token_ids == resident.generate(prompt, max_new_tokens=8).token_ids
    )


def test_an_offloaded_engine_votes_with_the_same_strided_rows():
    model = tiny_model("llama")
    ids = random_ids(300, seed=5)[0].tolist()
    resident, offloaded = _engines(model, CFG.replace(prefill_vote_stride=3), keys="host")
    (got, _), (want, _) = _logits(offloaded, ids), _logits(resident, ids)
    assert torch.equal(got, want)
    every, _ = _logits(_engines(model, CFG)[0], ids)
    assert not torch.equal(want, every)  # the stride changed what prefill selected


def test_the_offload_budget_reads_fewer_blocks_and_refinement_reads_more():
    model = tiny_model("llama")
    ids = random_ids(400, seed=4)[0].tolist()
    stores = {}
    for refine in (False, True):
        engine = ReAttentionEngine(
            model, ByteTokenizer(), CFG, cache=False, offload=OffloadConfig(block=8, budget=3, refine=refine, pin=False)
        )
        store = engine._runner.fresh_store(len(ids) + 1)
        stores[refine] = store
        with enable_reattention(engine.model, engine.config):
            run_prefill(engine.model, torch.tensor([ids]), ReAttentionCache(store), 16)
    budgeted, exact = stores[False], stores[True]
    assert 0 < budgeted.fetched_blocks < budgeted.bounded_blocks  # only the budget was read
    assert budgeted.fetched_blocks <= exact.fetched_blocks <= exact.bounded_blocks
    assert all(b.tokens == len(ids) for b in budgeted.bounds)  # every layer's bounds cover the store


def test_bounds_and_the_store_truncate_back_consistently():
    k, _ = keys_and_queries("randn", 1, 100, 2, 1, 1, 8, seed=5)
    store = OffloadedStore(1, OffloadConfig(block=16, pin=False), "cpu")
    store.append(0, k, k)
    store.truncate(37)
    again = KeyBounds.of(k[:, :37], 16)
    assert store.length(0) == store.bounds[0].tokens == 37
    assert torch.equal(store.bounds[0].kmin, again.kmin) and torch.equal(store.bounds[0].kmax, again.kmax)
    store.append(0, k[:, 37:50], k[:, 37:50])
    assert torch.equal(store.bounds[0].kmax, KeyBounds.of(k[:, :50], 16).kmax)


def test_offload_validates_its_config():
    with pytest.raises(InvalidInputError, match="budget"):
        OffloadConfig(budget=0)
    with pytest.raises(InvalidInputError, match='keys must be "host" or "device"'):
        OffloadConfig(keys="gpu")
    assert OffloadConfig(keys="device", refine=False).exact and not OffloadConfig(refine=False).exact
    with pytest.raises(InvalidInputError, match="offload must be"):
        ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), CFG, cache=False, offload={"block": 8})


def test_an_offloaded_engine_shares_exact_cache_pages_with_resident_engines(tmp_path):
    """Pages are what the resident engine computes (refine=True), so offloaded and resident engines
    reuse each other's pages, in memory and on disk; a budgeted selection caches apart."""
    from reattention_core import CacheConfig

    model = tiny_model("llama")
    corpus = "the quick brown fox jumps over the lazy dog. " * 12

    def engine(**offload):
        cfg = CacheConfig(dir=tmp_path, page_size=64)
        off = OffloadConfig(block=8, budget=2, pin=False, **offload) if offload else None
        return ReAttentionEngine(model, ByteTokenizer(), CFG, cache=cfg, offload=off)

    cold = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False).generate(
        "Who?", context=corpus, max_new_tokens=6
    )
    resident = engine()
    first = resident.generate("Who?", context=corpus, max_new_tokens=6)
    assert first.token_ids == cold.token_ids and first.cached_tokens == 0
    offloaded = engine(refine=True)  # a fresh engine: the pages come from disk, into host memory
    res = offloaded.generate("Who?", context=corpus, max_new_tokens=6)
    assert res.cached_tokens > 0 and res.token_ids == cold.token_ids
    again = offloaded.generate("What?", context=corpus, max_new_tokens=6)  # and now from its memory
    assert again.cached_tokens == res.cached_tokens
    assert again.token_ids == resident.generate("What?", context=corpus, max_new_tokens=6).token_ids
    split = engine(keys="device").generate("Who?", context=corpus, max_new_tokens=6)  # keys resident, values host
    assert split.cached_tokens == res.cached_tokens and split.token_ids == cold.token_ids
    budgeted = engine(refine=False).generate("Who?", context=corpus, max_new_tokens=6)
    assert budgeted.cached_tokens == 0  # its own fingerprint: nothing to reuse yet


@pytest.mark.gpu
@pytest.mark.parametrize("keys", ["host", "device"])
def test_offload_on_a_gpu_places_the_store_and_equals_the_resident_engine(keys):
    """On CUDA: pinned host buffers (keys too with keys="host"), the side-stream scope copies, and
    the Triton kernels give the resident engine's logits bit for bit, prefill and decode."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    resident = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False)
    offloaded = ReAttentionEngine(
        model, ByteTokenizer(), CFG, cache=False, offload=OffloadConfig(keys=keys, block=8, budget=2, refine=True)
    )
    ids = random_ids(700, seed=6)[0].tolist()
    (got, store), (want, _) = _logits(offloaded, ids), _logits(resident, ids)
    assert torch.equal(got, want)
    k, v = store.view(0)
    assert k.is_cuda == (keys == "device") and not v.is_cuda and v.is_pinned()
    prompt = "the quick brown fox jumps over the lazy dog. " * 20
    assert (
        offloaded.generate(prompt, max_new_tokens=12).token_ids
        == resident.generate(prompt, max_new_tokens=12).token_ids
    )


@pytest.mark.gpu
def test_pages_written_from_a_split_store_serve_a_resident_engine(tmp_path):
    """keys="device" writes pages from keys on the GPU and values in host memory; a resident engine
    in a fresh process-like state (new engine, same cache dir) reuses them and answers the same."""
    from reattention_core import CacheConfig

    model = tiny_model("llama").to("cuda", torch.bfloat16)
    corpus = "the quick brown fox jumps over the lazy dog. " * 12
    cfg = CacheConfig(dir=tmp_path, page_size=64)
    split = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=cfg, offload=OffloadConfig(keys="device"))
    first = split.generate("Who?", context=corpus, max_new_tokens=6)
    resident = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=cfg)
    again = resident.generate("Who?", context=corpus, max_new_tokens=6)
    assert again.cached_tokens > 0 and again.token_ids == first.token_ids


def test_evaluation_rows_record_the_store_and_exact_offload_reuses_resident_cells(tmp_path):
    from reattention_core.evaluation import NeedleGrid, ResultsFile, run_grid
    from reattention_core.evaluation.results import read_rows

    model = tiny_model("llama")
    grid = NeedleGrid(
        tasks=("passkey",), lengths=(256,), depths=(0.5,), modes=("reattention",), haystack="filler", max_new_tokens=3
    )

    def engine(offload):
        return ReAttentionEngine(model, ByteTokenizer(), CFG, model_name="tiny", cache=False, offload=offload)

    out = tmp_path / "r.jsonl"
    assert run_grid(engine(OffloadConfig(keys="device", pin=False)), grid, ResultsFile(out), progress=False).ran == 1
    assert run_grid(engine(None), grid, ResultsFile(out), progress=False).ran == 0  # exact: the same cell
    assert (
        run_grid(engine(OffloadConfig(budget=1, refine=False, pin=False)), grid, ResultsFile(out), progress=False).ran
        == 1
    )
    stores = [r["env"]["store"] for r in read_rows(out)]
    assert stores == ["offload(keys=device)", "offload(keys=host,block=64,budget=1,refine=False)"]


@pytest.mark.parametrize("keys", ["host", "device"])
def test_a_store_spilled_to_mapped_files_computes_the_same_and_leaves_no_files(tmp_path, keys):
    model = tiny_model("llama")
    resident, spilled = _engines(model, CFG, keys=keys, spill_dir=tmp_path)
    ids = random_ids(300, seed=8)[0].tolist()
    store = spilled._runner.fresh_store(16)  # small: it must grow (into new mapped files) while prefilling
    with enable_reattention(model, CFG):
        got = run_prefill(model, torch.tensor([ids]), ReAttentionCache(store), CFG.prefill_chunk_size)
    want, _ = _logits(resident, ids)
    assert torch.equal(got, want) and store.grow_events > 0
    assert list(tmp_path.iterdir()) == []  # mapped, then unlinked at once
    k, v = store.view(0)
    assert torch.equal(v, _logits(resident, ids)[1].view(0)[1])  # the values really are in the mapped buffers
    prompt = "the quick brown fox jumps over the lazy dog. " * 8
    assert spilled.generate(prompt, max_new_tokens=8).token_ids == resident.generate(prompt, max_new_tokens=8).token_ids


def test_a_spill_folder_must_exist_and_a_full_disk_is_a_typed_error(tmp_path, monkeypatch):
    import errno
    import os

    from reattention_core import StoreMemoryError
    from reattention_core.store.spill import spill_buffer

    with pytest.raises(InvalidInputError, match="is not an existing folder"):
        OffloadConfig(spill_dir=tmp_path / "missing")
    assert OffloadConfig(spill_dir=tmp_path).spill_dir == str(tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(StoreMemoryError, match=r"could not reserve 64.0 KiB in .* No space left on device"):
        spill_buffer(str(tmp_path), "values", (1, 1024, 2, 8), torch.float32)
    with pytest.raises(StoreMemoryError, match=r"could not reserve 2.00 GiB in .* No space left on device"):
        spill_buffer(str(tmp_path), "values", (1, 1 << 20, 2, 256), torch.float32)
    assert list(tmp_path.iterdir()) == []  # the half-made file is gone too


def test_the_memory_cache_cap_counts_the_keys_a_split_store_keeps_on_the_device(tmp_path):
    from reattention_core import CacheConfig
    from reattention_core.cache import default_memory_bytes

    model = tiny_model("llama")
    split = ReAttentionEngine(
        model, ByteTokenizer(), CFG, cache=CacheConfig(disk=False), offload=OffloadConfig(keys="device")
    )
    both = min(default_memory_bytes(split.device), default_memory_bytes(torch.device("cpu")))
    assert split._prefix.memory.max_bytes == 2 * both  # each half (keys, values) within a third of its memory
    mine = ReAttentionEngine(
        model,
        ByteTokenizer(),
        CFG,
        cache=CacheConfig(disk=False, memory_bytes=1 << 20),
        offload=OffloadConfig(keys="device"),
    )
    assert mine._prefix.memory.max_bytes == 1 << 20  # a cap the user set is kept
