"""An offloaded store keeps a prefix restored from the persistent cache in the page files (mapped)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from reattention_core import CacheConfig, OffloadConfig, ReAttentionConfig, ReAttentionEngine
from reattention_core.errors import InvalidInputError
from reattention_core.store.bounds import KeyBounds
from reattention_core.store.offloaded import OffloadedStore
from reattention_core.store.segments import TokenSegments
from tests.helpers import ByteTokenizer, tiny_model

CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=6, local_window=32, prefill_chunk_size=16)
CORPUS = "the quick brown fox jumps over the lazy dog; a pass key hides here: 48151. " * 8


def _parts(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 3, 4, generator=g) for n in lengths]


def test_token_segments_read_like_the_joined_tensor():
    parts = _parts([5, 0, 7, 1, 9])
    seg, whole = TokenSegments(parts), torch.cat(parts, 1)
    assert seg.shape == whole.shape and seg.dtype == whole.dtype and len(seg.parts) == 4  # the empty part is dropped
    for a, b in [(0, 22), (3, 5), (4, 13), (12, 13), (0, 0), (20, 40), (7, 3)]:
        assert torch.equal(seg[:, a:b], whole[:, a:b]), (a, b)
        assert torch.equal(seg[1, a:b], whole[1, a:b])
    assert torch.equal(seg[:, -4:], whole[:, -4:])
    g = torch.Generator().manual_seed(1)
    unsorted = (torch.randint(0, 22, (40,), generator=g), torch.arange(21, -1, -1), torch.tensor([12, 12, 0]))
    # sorted ones take the cut-at-part-bounds path: blocks, duplicates, part edges, one part only
    ordered = (
        torch.arange(22),
        torch.tensor([0, 4, 5, 11, 12, 13, 21]),
        torch.tensor([3, 3, 3, 14, 14]),
        torch.tensor([13, 14, 15, 21]),
        torch.tensor([4]),
        torch.randint(0, 22, (30,), generator=g).sort().values,
    )
    for idx in (*unsorted, *ordered):
        assert torch.equal(seg.index_select(1, idx), whole.index_select(1, idx))
        out = torch.empty(1, idx.numel(), 3, 4)
        seg.row(1).index_select(1, idx, out=out)
        assert torch.equal(out[0], whole[1].index_select(0, idx))
    assert seg.index_select(1, torch.tensor([], dtype=torch.int64)).shape == (2, 0, 3, 4)
    assert torch.equal(seg.materialize(), whole)


def test_token_segments_refuse_what_they_cannot_do():
    seg = TokenSegments(_parts([3, 4]))
    with pytest.raises(IndexError, match="out of range"):
        seg.index_select(1, torch.tensor([7]))
    with pytest.raises(IndexError, match="dim=1"):
        seg.index_select(0, torch.tensor([0]))
    with pytest.raises(IndexError, match="slice with no step"):
        seg[:, ::2]
    with pytest.raises(ValueError, match="one B, H, D"):
        TokenSegments([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5)])
    with pytest.raises(ValueError, match="one dtype"):
        TokenSegments([torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4, dtype=torch.float16)])


def test_adopted_pages_truncate_share_and_grow_like_copied_ones():
    """A store that adopts tensors by reference reads, truncates, shares and appends exactly like one that
    copies them, and its bounds equal bounds built from scratch."""
    parts = _parts([8, 8, 5], seed=2)
    parts = [p[:1] for p in parts]  # batch 1, as the engine's stores
    more = _parts([11], seed=3)[0][:1]
    whole = torch.cat([*parts, more], 1)
    cfg = OffloadConfig(block=4, pin=False, map_pages=True)
    store, copied = OffloadedStore(1, cfg, "cpu"), OffloadedStore(1, cfg, "cpu")
    store.reserve(600)
    copied.reserve(600)
    for p in parts:
        store.adopt(0, p, p * 2, device=torch.device("cpu"), dtype=p.dtype)
        copied.extend(0, p, p * 2, device=torch.device("cpu"), dtype=p.dtype)
    assert store.mapped_tokens() == 21 and copied.mapped_tokens() == 0
    assert store.nbytes() == 0  # nothing allocated: the adopted tensors are not the store's memory
    store.append(0, more, more * 2)
    copied.append(0, more, more * 2)
    for s in (store, copied):
        k, v = s.view(0)
        assert torch.equal(k[:, :], whole) and torch.equal(v[:, :], whole * 2)
        assert torch.equal(s.bounds[0].kmax, KeyBounds.of(whole, 4).kmax)
    # the buffers got the room the adopted tokens leave: same capacity, less memory
    assert store.capacity() == copied.capacity() == 600 and 0 < store.nbytes() < copied.nbytes()
    # a late adoption (tokens already in the buffers) falls back to a copy
    store.adopt(0, more, more, device=torch.device("cpu"), dtype=more.dtype)
    assert store.mapped_tokens() == 21 and store.length() == 43
    store.truncate(13)  # inside the second adopted page: the first 13 tokens stay, by reference
    assert store.mapped_tokens() == 13 and store.length() == 13
    assert torch.equal(store.view(0)[0][:, :], whole[:, :13])
    assert torch.equal(store.bounds[0].kmin, KeyBounds.of(whole[:, :13], 4).kmin)
    store.append(0, more, more)
    assert torch.equal(store.view(0)[0][:, :], torch.cat([whole[:, :13], more], 1))
    fresh = OffloadedStore(1, cfg, "cpu")
    fresh.share_prefix(store, 18)  # the 13 adopted tokens by reference, 5 tail tokens copied
    assert fresh.mapped_tokens() == 13 and torch.equal(fresh.view(0)[0][:, :], store.view(0)[0][:, :18])
    assert fresh.view(0)[0].parts[0].data_ptr() == parts[0].data_ptr()
    store.truncate(0)
    assert store.length() == store.mapped_tokens() == store.bounds[0].tokens == 0


def _page_digest(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.safetensors")}


def _engine(model, tmp_path, **offload) -> ReAttentionEngine:
    off = OffloadConfig(**{"block": 8, "budget": 2, "pin": False, **offload}) if offload else None
    return ReAttentionEngine(model, ByteTokenizer(), CFG, cache=CacheConfig(dir=tmp_path, page_size=64), offload=off)


def _segment_store(engine: ReAttentionEngine) -> OffloadedStore:
    (segment,) = engine._prefix.memory._segments
    return segment.store


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_a_corpus_restored_from_disk_stays_in_its_page_files_and_answers_the_same(tmp_path, arch):
    model = tiny_model(arch)
    cold = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False)
    _engine(model, tmp_path).generate("Who?", context=CORPUS, max_new_tokens=6)  # writes the pages
    before = _page_digest(tmp_path)
    assert len(before) >= 5
    mapped = _engine(model, tmp_path, keys="host", map_pages=True)
    res = mapped.generate("Which key?", context=CORPUS, max_new_tokens=8)
    assert (
        res.cached_tokens > 0
        and res.token_ids == cold.generate("Which key?", context=CORPUS, max_new_tokens=8).token_ids
    )
    store = _segment_store(mapped)
    assert all(store.mapped_tokens(layer) == res.cached_tokens for layer in range(store.num_layers))
    k = store.view(0)[0]
    assert isinstance(k, TokenSegments) and len(k.parts) == len(before)  # one part per page file, nothing joined
    kv_bytes = 2 * res.cached_tokens * k.shape[2] * k.shape[3] * k.dtype.itemsize * store.num_layers
    assert store.nbytes("cpu") < kv_bytes  # host buffers hold the question and answer only
    again = mapped.generate("Who?", context=CORPUS, max_new_tokens=8)  # borrowed from memory, pages still mapped
    assert again.cached_tokens == res.cached_tokens
    assert again.token_ids == cold.generate("Who?", context=CORPUS, max_new_tokens=8).token_ids
    assert _segment_store(mapped).mapped_tokens() == res.cached_tokens
    assert _page_digest(tmp_path) == before  # the cache files never change


def test_copy_on_write_shares_mapped_pages_and_evicted_files_stay_readable(tmp_path):
    model = tiny_model("llama")
    cold = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False)
    longer = CORPUS + "and then the story goes on for a while longer. " * 20  # over twice the shared pages
    _engine(model, tmp_path).generate("Who?", context=longer, max_new_tokens=4)
    mapped = _engine(model, tmp_path, keys="host", map_pages=True)
    first = mapped.generate("Who?", context=longer, max_new_tokens=6)
    for page in tmp_path.rglob("*.safetensors"):  # evicted (or cleared) while the store maps them
        page.unlink()
    # shares only the corpus's first pages with the segment: a new store that adopts those pages too
    res = mapped.generate("Which key?", context=CORPUS, max_new_tokens=8)
    assert 0 < res.cached_tokens < first.cached_tokens
    assert res.token_ids == cold.generate("Which key?", context=CORPUS, max_new_tokens=8).token_ids
    stores = [s.store for s in mapped._prefix.memory._segments]
    assert len(stores) == 2 and all(s.mapped_tokens() > 0 for s in stores)
    parts = [s.view(0)[0].parts[0].data_ptr() for s in stores]
    assert parts[0] == parts[1]  # the first page's mapping is shared, not copied


@pytest.mark.parametrize("offload", [{"keys": "host"}, {"keys": "device", "map_pages": True}])
def test_stores_that_do_not_map_copy_the_pages_and_answer_the_same(tmp_path, offload):
    model = tiny_model("llama")
    cold = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False)
    _engine(model, tmp_path).generate("Who?", context=CORPUS, max_new_tokens=4)
    engine = _engine(model, tmp_path, **offload)
    res = engine.generate("Which key?", context=CORPUS, max_new_tokens=8)
    assert (
        res.cached_tokens > 0
        and res.token_ids == cold.generate("Which key?", context=CORPUS, max_new_tokens=8).token_ids
    )
    store = _segment_store(engine)
    assert store.mapped_tokens() == 0 and isinstance(store.view(0)[1], torch.Tensor)


def test_map_pages_must_be_a_bool():
    with pytest.raises(InvalidInputError, match="map_pages must be a bool"):
        OffloadConfig(map_pages="yes")


@pytest.mark.gpu
def test_on_a_gpu_mapped_pages_feed_the_bounds_and_the_scope_and_answer_like_the_resident_engine(tmp_path):
    """On CUDA: bounds built on the GPU from mapped pages, scope copies from pageable mappings next to a
    pinned tail, the Triton kernels; the answer equals a resident engine's that restored the same pages."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    corpus = CORPUS * 3
    cfg = CacheConfig(dir=tmp_path, page_size=64)
    resident = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=cfg)
    first = resident.generate("Which key?", context=corpus, max_new_tokens=12)
    mapped = ReAttentionEngine(
        model, ByteTokenizer(), CFG, cache=cfg, offload=OffloadConfig(block=8, budget=2, map_pages=True)
    )
    res = mapped.generate("Which key?", context=corpus, max_new_tokens=12)
    assert res.cached_tokens > 0 and res.token_ids == first.token_ids
    store = _segment_store(mapped)
    k, _ = store.view(0)
    assert store.mapped_tokens() == res.cached_tokens and not k.is_cuda and store.bounds[0].kmax.is_cuda
