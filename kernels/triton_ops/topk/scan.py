"""The scan kernel: one pass over a split of the keys (decode), or phase 1 of two (prefill)."""

from __future__ import annotations

import triton
import triton.language as tl

from reattention_kernels.triton_ops.arrivals import last_arrival
from reattention_kernels.triton_ops.rows import group_rows
from reattention_kernels.triton_ops.select import select_row
from reattention_kernels.triton_ops.topk.merge import _merge_splits
from reattention_kernels.triton_ops.topk.sets import _admit, _empty_set, _keep_best, _store_sorted


@triton.jit
def _qk(b_q, b_k, IEEE: tl.constexpr):
    """``b_q [M, D] @ b_k [N, D]^T`` in fp32; exact fp32 products (no TF32) for fp32 inputs."""
    if IEEE:
        return tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    return tl.dot(b_q, tl.trans(b_k))


@triton.jit
def _scores(b_q, p_k, n0, n_hi, o_c, MASK: tl.constexpr, IEEE: tl.constexpr):
    """Scores ``[BM, BN]`` of the queries ``b_q`` against the keys ``[n0, n0 + BN)``; -inf past ``n_hi``."""
    if MASK:
        m_n = (n0 + o_c) < n_hi
        b_k = tl.load(p_k, mask=m_n[:, None], other=0.0)
    else:
        b_k = tl.load(p_k)
    b_s = _qk(b_q, b_k, IEEE)
    # [BM, BN]
    if MASK:
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
    return b_s


@triton.jit
def _scan_tile(b_q, p_k, n0, n_hi, b_v, b_i, b_kth, o_c, o_j, TOPK: tl.constexpr, KP: tl.constexpr,
               BN: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One pass: score the keys ``[n0, n0 + BN)`` (pointers ``p_k [BN, D]``) and admit them."""
    b_s = _scores(b_q, p_k, n0, n_hi, o_c, MASK, IEEE)
    return _admit(b_s, b_s, n0, b_v, b_i, b_kth, o_c, o_j, TOPK, KP, BN, False)


@triton.jit
def _tile_maxima(b_q, p_k, n0, n_hi, o_c, b_v, b_i, b_kth, o_j, KP: tl.constexpr, BN: tl.constexpr,
                 S: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr, b_k=None):  # fmt: skip
    """Phase 1 on one tile: enter each row's maximum of each of the tile's ``S`` sub-tiles (``BN / S``
    consecutive keys, in ascending order) into its set of best sub-tile maxima. The keys come from
    ``p_k``, or are ``b_k [BN, D]`` when given (loaded through a tensor descriptor).

    Sub-tiles are what phase 2 rescores per row: with ``S = 2`` it reads half the keys. The
    per-sub-tile maxima come from the same ``[BM, BN]`` scores, reshaped (no second dot)."""
    if b_k is None:
        b_s = _scores(b_q, p_k, n0, n_hi, o_c, MASK, IEEE)
    else:
        b_s = _qk(b_q, b_k, IEEE)
    SUB: tl.constexpr = BN // S
    i_t = n0 // SUB
    if S == 1:
        b_v, b_i, b_kth = _keep_best(tl.max(b_s, 1), i_t, b_v, b_i, b_kth, o_j, KP)
    else:
        BM: tl.constexpr = b_s.shape[0]
        # [BM, S]: the maximum of each run of SUB consecutive keys
        b_m = tl.max(tl.reshape(b_s, [BM, S, SUB]), 2)
        if S == 2:
            b_m0, b_m1 = tl.split(b_m)
            b_v, b_i, b_kth = _keep_best(b_m0, i_t, b_v, b_i, b_kth, o_j, KP)
            b_v, b_i, b_kth = _keep_best(b_m1, i_t + 1, b_v, b_i, b_kth, o_j, KP)
        else:
            tl.static_assert(S == 4, "sub-tiles per tile: 1, 2 or 4")
            # [BM, 2, 2] -> (even, odd) sub-tiles -> (0, 2) and (1, 3)
            b_e, b_o = tl.split(tl.reshape(b_m, [BM, 2, 2]))
            b_m0, b_m2 = tl.split(b_e)
            b_m1, b_m3 = tl.split(b_o)
            b_v, b_i, b_kth = _keep_best(b_m0, i_t, b_v, b_i, b_kth, o_j, KP)
            b_v, b_i, b_kth = _keep_best(b_m1, i_t + 1, b_v, b_i, b_kth, o_j, KP)
            b_v, b_i, b_kth = _keep_best(b_m2, i_t + 2, b_v, b_i, b_kth, o_j, KP)
            b_v, b_i, b_kth = _keep_best(b_m3, i_t + 3, b_v, b_i, b_kth, o_j, KP)
    return b_v, b_i, b_kth


@triton.jit(do_not_specialize=["TK", "R", "NSPLIT", "keys_per_split", "SK", "SW", "s_offset"])
def score_topk_fwd_kernel_scan(
    q,
    k,
    k_desc,
    o,
    ws_v,
    ws_i,
    shift,
    counter,
    sel,
    n_sel,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_ob,
    stride_ot,
    stride_oh,
    TK,
    R,
    NSPLIT,
    keys_per_split,
    SK,
    SW,
    s_offset,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    SHIFT: tl.constexpr,
    TWO_PHASE: tl.constexpr,
    S: tl.constexpr,
    TMA: tl.constexpr,
    SELECT: tl.constexpr = False,
    HRP: tl.constexpr = 1,
    BC: tl.constexpr = 1,
    SBLOCK: tl.constexpr = 1,
    SKP: tl.constexpr = 1,
    BS: tl.constexpr = 1,
    BSP: tl.constexpr = 1,
):
    """One pass (decode) or phase 1 of two (``TWO_PHASE``, prefill) over one split of the keys, for
    ``BM`` rows ``r = t * G + g`` of one (sequence, KV head); see kernels/README.md.

    One pass keeps each row's best ``TOPK`` keys; phase 1 each row's best ``TOPK`` tile (or, with
    ``S`` > 1, sub-tile) maxima, for phase 2 to rescore. Unsplit, the result goes to ``o [B, TQ, HQ,
    TOPK]``; with ``SPLIT``, each split's set goes to ``ws [B*H, R, NSPLIT, TOPK]``. With ``TMA``,
    phase 1's full tiles come through ``k_desc``, a tensor descriptor of ``k [B, TK, H, D]`` with
    blocks ``[1, BN, 1, D]``.

    ``SELECT`` (one pass, split): the last program of a batch row to finish (`arrivals.last_arrival`
    on ``counter [B]``) merges the row's partial sets (`_merge_splits`, as the merge kernel does) and
    selects its blocks into ``sel [B, SW]`` and ``n_sel [B]`` (`select.select_row`: ``SK`` blocks of
    ``BS`` at most, positions plus ``s_offset``): scoring, merge and selection in one launch."""
    i_m, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if SHIFT:  # the key count moved on the device since the launch was recorded (CUDA-graph replay)
        TK = TK + tl.load(shift).to(tl.int32)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_r, m_r, o_t, o_hq = group_rows(i_m, i_h, R, BM, G)
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, BN)
    o_j = tl.arange(0, KP)

    p_q = q + i_b * stride_qb + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)

    k_base = k + i_b * stride_kb + i_h * stride_kh
    n_lo = i_s * keys_per_split
    # with a shift, splits past the key count have nothing to score (not a negative range)
    n_hi = tl.maximum(tl.minimum(n_lo + keys_per_split, TK), n_lo)
    n_full = n_lo + (n_hi - n_lo) // BN * BN
    b_v, b_i, b_kth = _empty_set(BM, KP, TOPK)
    if TWO_PHASE:
        # phase 1: each row's best tile maxima of this split -> ws (phase 2 is its own kernel)
        for n0 in range(n_lo, n_full, BN):
            if TMA:
                b_k = k_desc.load([i_b.to(tl.int32), n0, i_h.to(tl.int32), 0]).reshape(BN, D)
                b_v, b_i, b_kth = _tile_maxima(b_q, k_base, n0, n_hi, o_c, b_v, b_i, b_kth, o_j, KP, BN, S, False,
                                               IEEE, b_k)  # fmt: skip
            else:
                p_k = k_base + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
                b_v, b_i, b_kth = _tile_maxima(b_q, p_k, n0, n_hi, o_c, b_v, b_i, b_kth, o_j, KP, BN, S, False, IEEE)
        if n_full < n_hi:
            p_k = k_base + (n_full + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
            b_v, b_i, b_kth = _tile_maxima(b_q, p_k, n_full, n_hi, o_c, b_v, b_i, b_kth, o_j, KP, BN, S, True, IEEE)
    else:
        for n0 in range(n_lo, n_full, BN):
            p_k = k_base + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
            b_v, b_i, b_kth = _scan_tile(b_q, p_k, n0, n_hi, b_v, b_i, b_kth, o_c, o_j, TOPK, KP, BN, False, IEEE)
        if n_full < n_hi:
            p_k = k_base + (n_full + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
            b_v, b_i, b_kth = _scan_tile(b_q, p_k, n_full, n_hi, b_v, b_i, b_kth, o_c, o_j, TOPK, KP, BN, True, IEEE)
    if SPLIT:
        # partial set, best first -> ws[bh, r, split, :]
        o_w = (i_bh * R + o_r).to(tl.int64) * NSPLIT + i_s
        _store_sorted(b_v, b_i, o_j, ws_i + o_w * TOPK, ws_v + o_w * TOPK, m_r, TOPK, KP, True)
        if SELECT:  # noqa: SIM102  (nested: without SELECT, ``counter`` is no count tensor)
            # the batch row's last program to finish sees every split's partial set (`arrivals`)
            if last_arrival(counter, i_b, tl.num_programs(0) * tl.num_programs(1) * H):
                # the batch row's H * R rows, each with its TOPK best keys of all splits (order is no matter:
                # the selection votes over the set); -1 in empty slots and padding
                o_rb = tl.arange(0, HRP)
                m_rb = o_rb < H * R
                n_c = NSPLIT * TOPK
                _, b_h = _merge_splits(ws_v, ws_i, (i_b * H * R + o_rb).to(tl.int64) * n_c, m_rb, n_c, tl.arange(0, BC),
                                       o_j, HRP, TOPK, KP, BC, ".cg")  # fmt: skip
                h = tl.reshape(tl.where(m_rb[:, None], b_h, -1), [HRP * KP]).to(tl.int64)
                select_row(h, (h >= 0) & (h < TK), sel, n_sel, i_b, TK, SK, SW, s_offset, HRP * KP, SBLOCK, SKP, BS,
                           BSP)  # fmt: skip
    else:
        _store_sorted(b_v, b_i, o_j, o + i_b * stride_ob + o_t * stride_ot + o_hq * stride_oh, o, m_r, TOPK, KP, False)
