"""Step graphs (prefill chunks and decode steps) on the Triton kernels: emulated replays (interpreter on CPU)
and, on a GPU, real recordings give the tokens of ordinary decode steps."""

from __future__ import annotations

import pytest
import torch

from reattention_core import ReAttentionEngine
from tests.cuda_graph_helpers import CFG, assert_same_store, decode
from tests.helpers import ByteTokenizer, random_ids, tiny_model


def _model(arch: str = "llama"):
    model = tiny_model(arch, hidden_size=128, head_dim=32)  # the kernels need head dim >= 32
    return model.cuda() if torch.cuda.is_available() else model


@pytest.mark.parametrize("n, steps", [(70, 10), (9, 14)])
def test_emulated_replays_on_triton_kernels_equal_eager_decode(n, steps):
    model = _model()
    ids = random_ids(n, seed=n)
    eager = decode(model, ids, steps, "eager", backend="triton")
    emulated = decode(model, ids, steps, "emulated", backend="triton")
    assert emulated[0] == eager[0] and emulated[3] > 0 and (n < 40 or emulated[4] > 0)
    # the grids differ (a replay's cover the whole buffers), so the split merges round differently
    torch.testing.assert_close(emulated[1], eager[1], atol=1e-4, rtol=1e-4)
    assert_same_store(emulated[2], eager[2], atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recorded_graph_replays_equal_emulated_replays(arch, dtype):
    model = _model(arch).to(dtype)
    ids = random_ids(90, seed=1)
    emulated = decode(model, ids, 24, "emulated", backend="triton")
    graph = decode(model, ids, 24, "graph", backend="triton")
    eager = decode(model, ids, 24, "eager", backend="triton")
    assert graph[3] == 24 and graph[4] == emulated[4] > 0
    # the same kernels with the same arguments: bit for bit
    assert graph[0] == emulated[0] and torch.equal(graph[1], emulated[1])
    assert_same_store(graph[2], emulated[2], atol=0, rtol=0)
    assert graph[0] == eager[0]


@pytest.mark.gpu
@pytest.mark.parametrize("cache", [False, True])
def test_engine_generates_the_same_text_with_and_without_graphs(cache):
    model = _model()
    prompt = "the quick brown fox jumps over the lazy dog; " * 3
    engine = ReAttentionEngine(model, ByteTokenizer(), CFG, backend="triton", cache=cache, cuda_graphs=True)
    with_graphs = engine.generate(prompt, max_new_tokens=20)
    engine.cuda_graphs = False
    without = engine.generate(prompt, max_new_tokens=20)
    assert with_graphs.token_ids == without.token_ids and len(without.token_ids) == 20


@pytest.mark.gpu
def test_engine_warmup_records_graphs_on_cuda():
    engine = ReAttentionEngine(_model(), ByteTokenizer(), CFG, backend="triton", cache=False)
    assert engine.warmup() > 0


@pytest.mark.gpu
def test_prefix_cache_reuse_through_graphs_gives_the_cold_tokens():
    """What `reattention eval` does: prompts that share their text up to a needle, the shared pages
    reused from the in-memory cache and the rest prefilled through graphs, answer as cold runs do."""
    from reattention_core.cache import CacheConfig

    model = _model()
    haystack = "the quick brown fox jumps over the lazy dog; " * 12
    prompts = [
        haystack[:480] + "pass key 12345. " + haystack[480:],
        haystack[:200] + "pass key 67890. " + haystack[200:],
    ]
    cold = ReAttentionEngine(model, ByteTokenizer(), CFG, backend="triton", cache=False)
    warm = ReAttentionEngine(model, ByteTokenizer(), CFG, backend="triton", cache=CacheConfig(disk=False, page_size=32))
    for prompt, cached in zip(prompts, (0, 192), strict=True):
        w, c = warm.generate(prompt, max_new_tokens=16), cold.generate(prompt, max_new_tokens=16)
        assert w.cached_tokens == cached and c.cached_tokens == 0
        assert w.token_ids == c.token_ids and len(c.token_ids) == 16
