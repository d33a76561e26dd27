"""The split merge: each row's best ``TOPK`` of the partial sets that the key splits wrote."""

from __future__ import annotations

import triton
import triton.language as tl

from reattention_kernels.triton_ops.rows import row_heads
from reattention_kernels.triton_ops.topk.sets import _admit, _empty_set, _store_sorted


@triton.jit
def _merge_splits(ws_v, ws_i, o_w, m_r, n_c, o_c, o_j, BR: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                  BC: tl.constexpr, CACHE: tl.constexpr):  # fmt: skip
    """The best ``TOPK`` of the ``n_c`` candidates of each row (``ws[o_w + c]``, stored split after
    split, each split's best first): among equal values they come in ascending index order, as
    the admission rule needs. ``CACHE``: the loads' cache modifier (``.cg`` in the launch that wrote
    ``ws``: the other programs' sets are in the L2, not this SM's L1; ``""`` elsewhere). Callers pass it:
    Triton 3.6 hands a nested call's default string on unwrapped and fails to compile."""
    b_v, b_i, b_kth = _empty_set(BR, KP, TOPK)
    for c0 in range(0, n_c, BC):
        m_w = m_r[:, None] & ((c0 + o_c) < n_c)[None, :]
        p_w = o_w[:, None] + c0 + o_c[None, :]
        # [BR, BC]
        b_s = tl.load(ws_v + p_w, mask=m_w, other=float("-inf"), cache_modifier=CACHE)
        b_ci = tl.load(ws_i + p_w, mask=m_w, other=-1, cache_modifier=CACHE)
        b_v, b_i, b_kth = _admit(b_s, b_ci, c0, b_v, b_i, b_kth, o_c, o_j, TOPK, KP, BC, True)
    return b_v, b_i


@triton.jit(do_not_specialize=["R", "NSPLIT"])
def score_topk_fwd_kernel_merge(
    ws_v,
    ws_i,
    o,
    stride_ob,
    stride_ot,
    stride_oh,
    R,
    NSPLIT,
    H: tl.constexpr,
    G: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """``BR`` rows of one (sequence, KV head): their ``NSPLIT`` partial sets ``ws [B*H, R, NSPLIT,
    TOPK]`` merged into the output ``o [B, TQ, HQ, TOPK]``, best first."""
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_j = tl.arange(0, KP)
    n_c = NSPLIT * TOPK
    b_v, b_i = _merge_splits(ws_v, ws_i, (i_bh * R + o_r).to(tl.int64) * n_c, m_r, n_c, tl.arange(0, BC), o_j,
                             BR, TOPK, KP, BC, "")  # fmt: skip
    o_t, o_hq = row_heads(o_r, i_h, G)
    _store_sorted(b_v, b_i, o_j, o + i_b * stride_ob + o_t * stride_ot + o_hq * stride_oh, o, m_r, TOPK, KP, False)
