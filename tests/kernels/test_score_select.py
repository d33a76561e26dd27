"""`score_select`: a decode step's scoring, split merge and selection in one kernel, against the references.

The fused path (the scan's last program per batch row merges the key splits and selects the blocks;
``fuse_selection`` / `KernelOptions.fuse_decode_selection`, off by default, asked for here) must give exactly what
`select_from_hits_ref(score_topk_ref(...))` gives; the separate merge and selection kernels must not
run where it applies, and its arrival counts must be back at zero after every launch (the next
launch, or a graph replay, starts from them).
"""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import KernelOptions, score_select
from reattention_kernels.reference import score_topk_ref, select_from_hits_ref
from reattention_kernels.triton_ops.arrivals import counts_are_zero
from tests.kernels.test_topk import DTYPES, make_keys, make_queries


def reference(q, k, top_k, max_blocks, block, offset, length=None):
    k = k if length is None else k[:, :length]
    hits = score_topk_ref(q, k, top_k)
    return select_from_hits_ref(hits.reshape(hits.shape[0], -1), k.shape[1], max_blocks, block, offset)


@pytest.fixture
def no_separate_kernels(monkeypatch):
    """Make the split merge and the one-program selection fail if launched (the tests ask for the fused path)."""
    from reattention_kernels.triton_ops import select
    from reattention_kernels.triton_ops.topk import merge

    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("a separate merge or selection kernel ran where the scan should select")

    monkeypatch.setattr(merge, "score_topk_fwd_kernel_merge", Refused())
    monkeypatch.setattr(select, "_select_small", Refused())


# (B, TK, HQ, H, D, dtype, top_k, kind, splits, max_blocks, block, offset)
CASES = [
    (1, 777, 9, 3, 64, "fp32", 4, "randn", 5, 32, 32, 64),  # the embedded preset's shape, more splits than needed
    (1, 777, 9, 3, 64, "fp16", 4, "dup", 7, 8, 16, 0),  # repeated keys: ties in the merge; clipping decides
    (2, 301, 4, 1, 128, "fp32", 8, "int", 3, 6, 7, 3),  # MHA-like group of 4 on one KV head, ties everywhere, 2 rows
    (1, 250, 4, 4, 64, "fp32", 3, "int", 4, 32, 5, 1),  # GQA ratio 1, top-3 (padded sets), odd block
    (1, 90, 6, 2, 128, "fp16", 5, "dup", 6, 2, 32, 0),  # blocks wider than the middle's share
    (2, 40, 3, 3, 64, "fp32", 1, "randn", 2, 32, 4, 9),  # top-1, a short middle in 2 splits
]


@pytest.mark.parametrize(
    ("b", "tk", "hq", "h", "d", "dtype", "top_k", "kind", "splits", "max_blocks", "block", "offset"),
    [pytest.param(*c, id="B{}-TK{}-HQ{}-H{}-D{}-{}-k{}-{}-s{}-mb{}-bs{}-o{}".format(*c)) for c in CASES],
)
def test_a_decode_step_selects_in_the_scan(
    b, tk, hq, h, d, dtype, top_k, kind, splits, max_blocks, block, offset, device, no_separate_kernels
):
    from reattention_kernels.triton_ops.topk import TopkTuning, score_select_triton

    for seed in range(2):
        torch.manual_seed(seed)
        q = make_queries(b, 1, hq, d, DTYPES[dtype], device, kind)
        k = make_keys(b, tk, h, d, DTYPES[dtype], device, kind)
        sel, n_sel = score_select_triton(
            q, k, top_k, max_blocks, block, offset, fuse_selection=True, tuning=TopkTuning(splits=splits)
        )
        want_sel, want_n = reference(q, k, top_k, max_blocks, block, offset)
        assert sel.shape == want_sel.shape and sel.dtype == n_sel.dtype == torch.int64
        assert torch.equal(n_sel, want_n) and torch.equal(sel, want_sel), f"seed {seed}"
        assert counts_are_zero()


def test_a_shifted_step_selects_over_the_shifted_middle(device, no_separate_kernels) -> None:
    """A CUDA-graph step's launch: the grid covers the whole buffer, the middle ends ``shift`` rows later."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_select_triton

    torch.manual_seed(3)
    q = make_queries(1, 1, 9, 64, torch.float32, device, "randn")
    k = make_keys(1, 500, 3, 64, torch.float32, device, "dup")
    for grown in (0, 1, 57):
        shift = torch.tensor([grown], dtype=torch.int64, device=device)
        sel, n_sel = score_select_triton(
            q, k, 4, 32, 32, 64, length=400, shift=shift, fuse_selection=True, tuning=TopkTuning(splits=4)
        )
        want_sel, want_n = reference(q, k, 4, 32, 32, 64, length=400 + grown)
        assert torch.equal(n_sel, want_n) and torch.equal(sel, want_sel), f"shift {grown}"
    assert counts_are_zero()


@pytest.mark.parametrize("case", ["prefill", "many hits", "switched off"])
def test_other_steps_take_the_separate_kernels_and_agree(case, device, monkeypatch) -> None:
    from reattention_kernels.triton_ops.topk import plan

    calls = []
    real = plan.fused_selection
    monkeypatch.setattr(plan, "fused_selection", lambda *a: calls.append(real(*a)) or calls[-1])
    tq, hq, h, top_k = {"prefill": (5, 6, 2, 4), "many hits": (1, 32, 8, 8), "switched off": (1, 9, 3, 4)}[case]
    options = KernelOptions(backend="triton", fuse_decode_selection=case != "switched off")
    torch.manual_seed(1)
    q = make_queries(1, tq, hq, 64, torch.float32, device, "dup")
    k = make_keys(1, 300, h, 64, torch.float32, device, "dup")
    got = score_select(q, k, top_k, 32, 8, 0, kernel_options=options)
    want = reference(q, k, top_k, 32, 8, 0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert all(c is None for c in calls)  # asked (decode) and declined, or never asked (two phases)


def test_selection_asks_for_the_fused_op(device, monkeypatch) -> None:
    """`reattention_core.attention.selection.select_blocks` goes through `score_select`, so the engine's decode
    steps get the one-launch path."""
    from reattention_core.attention import selection

    seen = []
    monkeypatch.setattr(selection, "score_select", lambda *a, **kw: seen.append(kw) or ("sel", "n"))
    q, k = torch.zeros(1, 1, 9, 64, device=device), torch.zeros(1, 50, 3, 64, device=device)
    assert selection.select_blocks(q, k, top_k=4, max_blocks=32, block_size=32, offset=64) == ("sel", "n")
    assert len(seen) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_embedded_models_decode_step_selects_in_the_scan_at_1m_keys(dtype, no_separate_kernels) -> None:
    """The preset's step (9 query / 3 KV heads, top-4, 32 blocks of 32) over a middle of 1,000,003 keys
    with repeats, as the engine's CUDA graph replays it while the middle grows: the GPU's atomics and
    memory ordering, with the default split count (many programs finishing in any order)."""
    from reattention_kernels.triton_ops.topk import score_select_triton

    torch.manual_seed(0)
    q = make_queries(1, 1, 9, 64, DTYPES[dtype], "cuda", "randn")
    k = make_keys(1, 1_000_003, 3, 64, DTYPES[dtype], "cuda", "dup")
    shift = torch.zeros(1, dtype=torch.int64, device="cuda")
    length = 999_000

    def step():
        return score_select_triton(q, k, 4, 32, 32, 64, length=length, shift=shift, fuse_selection=True)

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, n_sel = step()
    for grown in (0, 1, 500, 1003):
        shift.fill_(grown)
        for _ in range(3):
            graph.replay()
            want_sel, want_n = reference(q, k, 4, 32, 32, 64, length=length + grown)
            assert torch.equal(n_sel, want_n) and torch.equal(sel, want_sel), f"shift {grown}"
    assert counts_are_zero()
