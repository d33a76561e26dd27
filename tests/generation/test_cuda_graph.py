"""Step graphs: the shifted step (what a CUDA-graph replay runs) equals ordinary prefill chunks and
decode steps.

On CPU the replays are emulated eagerly with the reference kernels (`StepGraph(record=False)`):
the host passes the lengths of the first shiftable step and ``shift`` carries the growth, exactly
the arguments a replay sees. The Triton kernels and real recordings are tested in
`tests/kernels/test_cuda_graph_kernels.py`.
"""

from __future__ import annotations

import pytest
import torch

from reattention_core import ReAttentionEngine
from reattention_core.generation.cuda_graph import StepGraph, graphs_enabled
from tests.cuda_graph_helpers import CFG, assert_same_store, decode
from tests.helpers import ByteTokenizer, random_ids, tiny_model

# (prompt tokens, decode steps): prefill chunks past sink + local window are replayed, then decode
# steps; a short prompt whose first decode steps run eagerly and the shifted ones start midway
CASES = [(70, 12), (9, 20)]


@pytest.mark.parametrize("n, steps", CASES)
def test_emulated_replays_equal_eager_decode(tiny_arch, n, steps):
    model = tiny_model(tiny_arch)
    ids = random_ids(n, seed=n)
    eager = decode(model, ids, steps, "eager", backend="reference")
    emulated = decode(model, ids, steps, "emulated", backend="reference")
    assert emulated[0] == eager[0]
    torch.testing.assert_close(emulated[1], eager[1], atol=1e-5, rtol=1e-5)
    assert_same_store(emulated[2], eager[2], atol=0, rtol=0)
    shiftable_steps = sum(1 for i in range(steps) if n + i + 1 > CFG.sink_size + CFG.local_window)
    assert emulated[3] == shiftable_steps > 0  # the shifted path ran, and only where it applies
    # full-size prefill chunks (the last token runs alone) whose end is past sink + local window
    chunk = CFG.prefill_chunk_size
    full_chunks = [s for s in range(0, n - 1, chunk) if s + chunk <= n - 1]
    assert emulated[4] == sum(1 for s in full_chunks if s + chunk > CFG.sink_size + CFG.local_window)


def test_shifted_context_is_scoped():
    from reattention_core import ReAttentionCache
    from reattention_core.store import ResidentStore

    shift = torch.zeros(1, dtype=torch.int64)
    cache = ReAttentionCache(ResidentStore(2))
    assert cache.step.shift is None
    with cache.shifted(shift) as step:
        assert cache.step is step and step.shift is shift and step.store is cache.store
    assert cache.step.shift is None


def test_graph_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv("REATTENTION_CUDA_GRAPHS", "0")
    assert not graphs_enabled()
    monkeypatch.setenv("REATTENTION_CUDA_GRAPHS", "1")
    assert graphs_enabled()
    monkeypatch.setenv("REATTENTION_CUDA_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="REATTENTION_CUDA_GRAPHS"):
        graphs_enabled()


def test_recording_needs_cuda_and_a_resident_store():
    model = tiny_model("llama")
    from reattention_core import ReAttentionCache
    from reattention_core.store import ResidentStore
    from reattention_core.store.offloaded import OffloadConfig, OffloadedStore

    with pytest.raises(ValueError, match="CUDA"):
        StepGraph(model, ReAttentionCache(ResidentStore(2)), CFG, 64)
    with pytest.raises(TypeError, match="resident KVStore"):
        StepGraph(model, ReAttentionCache(OffloadedStore(2, OffloadConfig(), torch.device("cpu"))), CFG, 64)


def test_engine_uses_no_graph_off_cuda():
    engine = ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), CFG, backend="reference")
    from reattention_core import ReAttentionCache
    from reattention_core.store import ResidentStore

    graphs = engine._graphs()
    assert graphs.decode(ReAttentionCache(ResidentStore(2)), 100, 50) is None
    assert graphs.prefill(ReAttentionCache(ResidentStore(2)), 1000, 1100) is None


def test_a_graph_runs_steps_of_its_own_size_only():
    model = tiny_model("llama")
    from reattention_core import ReAttentionCache
    from reattention_core.store import ResidentStore

    graph = StepGraph(model, ReAttentionCache(ResidentStore(2)), CFG, 64, tokens=8, record=False)
    with pytest.raises(ValueError, match="8 tokens"):
        graph.step_token(5)


def test_graphs_are_used_only_where_every_kernel_has_its_triton_path():
    """A fallback kernel reads a recorded step's shift on the host, which a capture forbids (it failed
    the tiny head-dim-16 models on the H100), so the engine must not record graphs for such shapes."""
    from reattention_kernels import shifted_steps_supported

    assert shifted_steps_supported(64, 4, 32, 32) and shifted_steps_supported(128, 8, 64, 32)
    assert not shifted_steps_supported(16, 2, 6, 4)  # the tiny test models: reference attention
    assert not shifted_steps_supported(48, 4, 32, 32)  # not a power of two
    assert not shifted_steps_supported(64, 9, 32, 32)  # top_k over the kernel's 8
    assert not shifted_steps_supported(64, 4, 512, 64)  # selection tile over the register budget


def test_cuda_graphs_is_an_engine_argument_whose_default_the_environment_sets(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setenv("REATTENTION_CUDA_GRAPHS", "0")
    assert ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False).cuda_graphs is False
    monkeypatch.delenv("REATTENTION_CUDA_GRAPHS")
    assert ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False).cuda_graphs is True
    engine = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False, cuda_graphs=False)
    assert engine.cuda_graphs is False and not engine._graphs().enabled
    from reattention_core import InvalidInputError

    with pytest.raises(InvalidInputError, match="cuda_graphs"):
        ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False, cuda_graphs="no")
