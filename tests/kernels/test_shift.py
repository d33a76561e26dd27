"""Shifted lengths (what a CUDA graph of a decode step relies on): every Triton op, given the
store's whole buffers, host lengths of an earlier step and a device ``shift``, equals its
reference on the buffers cut at the shifted lengths."""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import KernelOptions, scope_attention, score_topk, select_from_hits
from reattention_kernels.reference import scope_attention_ref, score_topk_ref, select_from_hits_ref
from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

TRITON, REFERENCE = KernelOptions(backend="triton"), KernelOptions(backend="reference")


def _shift(n: int, device: str) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int64, device=device)


@pytest.mark.parametrize(
    ("splits", "subtiles", "rescore_by"),
    [(None, None, None), (1, None, None), (5, None, None), (1, 2, None), (5, 2, None), (None, 1, "tiles"),
     (5, 2, "tiles")],
)  # fmt: skip
@pytest.mark.parametrize("s", [0, 1, 37])
def test_shifted_topk_scores_the_grown_middle_only(device, s, splits, subtiles, rescore_by):
    g = torch.Generator().manual_seed(s)
    cap, length = 400, 200
    q = torch.randn(1, 2, 6, 64, generator=g).to(device)
    k = torch.randn(1, cap, 2, 64, generator=g).to(device)
    # rows past the shifted length hold the best keys: they must not be picked
    k[:, length + s :] = q[:, :1, :1].reshape(1, 1, 1, 64) * 10
    # sub-tiles need two phases, which a GPU takes by default only for more rows than these 12
    two_phase = True if subtiles else None
    tuning = TopkTuning(splits=splits, subtiles=subtiles, two_phase=two_phase, rescore_by=rescore_by)
    got = score_topk_fwd(q, k, 4, length=length, shift=_shift(s, device), tuning=tuning)
    want = score_topk_ref(q, k[:, : length + s], 4)
    assert torch.equal(got, want)
    assert torch.equal(score_topk(q, k, 4, length=length, shift=_shift(s, device), kernel_options=REFERENCE), want)


@pytest.mark.parametrize("s", [0, 3, 120])
def test_shifted_selection_clips_blocks_to_the_grown_middle(device, s, selection_path):
    g = torch.Generator().manual_seed(s)
    middle, cap = 300, 600
    grown = middle + s
    hits = torch.randint(0, grown, (2, 48), generator=g)
    hits[:, :4] = grown - 1  # most votes at the very end: its block is clipped there
    hits[1, 10:20] = -1
    hits = hits.to(device)
    got = select_from_hits(
        hits, middle, 8, 16, 32, shift=_shift(s, device), max_middle_len=cap, kernel_options=selection_path
    )
    want = select_from_hits_ref(hits, grown, 8, 16, 32)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    ref = select_from_hits(hits, middle, 8, 16, 32, shift=_shift(s, device), kernel_options=REFERENCE)
    assert torch.equal(ref[0], want[0]) and torch.equal(ref[1], want[1])


@pytest.mark.parametrize("s", [0, 5, 64])
def test_shifted_scope_attention_reads_the_moved_local_window(device, s):
    torch.manual_seed(s)
    cap, t, local = 320, 200, 40
    q = torch.randn(1, 1, 6, 64, device=device)
    k = torch.randn(1, cap, 2, 64, device=device)
    v = torch.randn(1, cap, 2, 64, device=device)
    sel = torch.tensor([[10, 11, 12, 50, 51, 90, 0, 0]], device=device)
    n_sel = torch.tensor([6], device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, device=device).float() / 64))
    kw = dict(sink_len=4, inv_freq=inv_freq, attention_scaling=1.0, scale=0.125)
    got, lse = scope_attention(
        q, k, v, sel, n_sel, local_start=t - local, length=t, shift=_shift(s, device), return_lse=True,
        kernel_options=TRITON, **kw,
    )  # fmt: skip
    want, want_lse = scope_attention_ref(
        q, k[:, : t + s], v[:, : t + s], sel, n_sel, local_start=t + s - local, return_lse=True, **kw
    )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)
    ref, _ = scope_attention(
        q, k, v, sel, n_sel, local_start=t - local, length=t, shift=_shift(s, device), kernel_options=REFERENCE, **kw
    )
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=1e-5)


def test_a_shift_without_length_is_refused(device):
    q, k = torch.randn(1, 1, 2, 64, device=device), torch.randn(1, 8, 1, 64, device=device)
    with pytest.raises(ValueError, match="length"):
        score_topk(q, k, 2, shift=_shift(1, device))
