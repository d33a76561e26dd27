"""`score_select` (scoring and selection as one op; Triton fuses a decode step's split merge, votes,
clip and blocks into one kernel) against the two references one after the other."""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import score_select
from reattention_kernels.dispatch import interpreting
from reattention_kernels.reference import score_topk_ref, select_from_hits_ref
from tests.kernels.test_topk import DTYPES, make_keys, make_queries


def reference(q, k, top_k, max_blocks, block_size, offset):
    hits = score_topk_ref(q, k, top_k)
    return select_from_hits_ref(hits.reshape(q.shape[0], -1), k.shape[1], max_blocks, block_size, offset)


@pytest.fixture(params=[4, 16], ids=["programs4", "programs16"])
def programs(request, monkeypatch):
    """Programs the scan aims for: more programs, more key splits for the merge to fuse."""
    from reattention_kernels.triton_ops import topk

    monkeypatch.setattr(topk, "_target_programs", lambda device: request.param)
    return request.param


# (B, TQ, TK, HQ, H, D, dtype, top_k, kind, max_blocks, block_size, offset)
CASES = [
    (1, 1, 700, 9, 3, 64, "fp16", 4, "dup", 32, 32, 32),  # the embedded preset's decode step: 36 hits
    (1, 1, 500, 4, 1, 128, "fp32", 8, "int", 8, 16, 0),  # GQA 4, ties everywhere, more hits than blocks
    (2, 1, 300, 6, 2, 64, "fp32", 3, "randn", 4, 7, 5),  # GQA 3, two batch rows, odd block
    (1, 2, 400, 8, 8, 64, "fp16", 2, "randn", 32, 16, 1),  # GQA 1, two query tokens
    (1, 1, 1000, 32, 8, 128, "fp16", 8, "dup", 32, 32, 4),  # Llama-3.1-8B shapes: 256 hits
    (1, 1, 37, 4, 1, 64, "fp32", 4, "randn", 32, 32, 2),  # a middle of one block; blocks clipped at both ends
    (1, 40, 300, 4, 1, 64, "fp16", 4, "randn", 16, 8, 3),  # a prefill chunk: the two ops, unfused
]


@pytest.mark.parametrize("b, tq, tk, hq, h, d, dtype, top_k, kind, max_blocks, block, offset", CASES)
def test_score_select_equals_the_references(device, programs, b, tq, tk, hq, h, d, dtype, top_k, kind, max_blocks,
                                            block, offset):  # fmt: skip
    from reattention_kernels.triton_ops.topk import score_topk_partials

    for seed in range(2):
        torch.manual_seed(seed)
        q = make_queries(b, tq, hq, d, DTYPES[dtype], device, kind)
        k = make_keys(b, tk, h, d, DTYPES[dtype], device, kind)
        sel, n_sel = score_select(q, k, top_k, max_blocks, block, offset, backend="triton")
        want_sel, want_n = reference(q, k, top_k, max_blocks, block, offset)
        assert sel.shape == want_sel.shape and sel.dtype == n_sel.dtype == torch.int64
        assert torch.equal(n_sel, want_n) and torch.equal(sel, want_sel), f"seed {seed}"
        got_ref = score_select(q, k, top_k, max_blocks, block, offset, backend="reference")
        assert torch.equal(got_ref[0], want_sel) and torch.equal(got_ref[1], want_n)
    # with enough programs every decode step splits its keys (a GPU aligns splits to 256 keys) and takes the fused
    # kernel; a prefill chunk never does
    fused = score_topk_partials(q, k, top_k) is not None
    if tq == 1 and programs == 16 and (interpreting() or tk >= 512):
        assert fused
    if tq == 40:
        assert not fused


@pytest.mark.gpu
@pytest.mark.parametrize("tk, hq, h, d, top_k", [(1 << 20, 9, 3, 64, 4), (131072, 32, 8, 128, 8)])
def test_score_select_at_real_shapes(tk, hq, h, d, top_k):
    """A decode step of the embedded preset over a 1M-token middle and of Llama-8B shapes at 128K."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k = make_keys(1, tk, h, d, torch.bfloat16, "cuda", "dup")
    got = score_select(q, k, top_k, 32, 32, 32, backend="triton")
    want = reference(q, k, top_k, 32, 32, 32)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
