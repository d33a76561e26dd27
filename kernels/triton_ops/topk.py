"""Exact fused ``q . k`` scoring + per-row top-k (the position-agnostic first attention).

One program owns ``BM`` rows of one (sequence, KV head): the ``G`` query heads of the group times
the query tokens, row ``r = t * G + g``, so every K tile is loaded once for the whole group. It
streams the keys of its range in tiles of ``BN``, scores them with one ``tl.dot`` and keeps, per
row, the best ``TOPK`` (score, index) pairs in registers as an unordered set whose worst entry is
the admission threshold. A tile whose row maxima cannot beat any row's threshold costs one row-max
and one compare; otherwise the row maxima are extracted one at a time until no row improves.

Keys are visited in ascending index order, so a candidate that ties the threshold always loses:
that is the reference's order (score descending, index ascending) without a tie-break pass.
Decode (few rows) splits the key range over many programs (split-K); a second kernel merges the
partial sets.

Prefill (``_TWO_PHASE_MIN_ROWS`` rows and more) runs in two phases, because in one pass most tiles
of a 64-row program improve some row, and each extraction step costs about five ALU operations per
score against one for a row maximum:

1. (scan kernel) score every tile with one ``tl.dot`` and enter each row's tile maximum, with the
   tile's index, into the row's set of its ``TOPK`` best tile maxima (ties: the lower tile). That is
   one row maximum and a few operations on ``[BM, TOPK]`` per tile, with no branch: no block-wide
   vote per tile stalls the pipelined tile loop. A split writes these sets, best first, to a small
   workspace.
2. per row, the ``TOPK`` best tiles over all splits (merged as the partial sets of decode are),
   rescored exactly into the final set: ``TOPK * BN`` keys per row instead of all of them. Two ways
   (`_rescore_by` picks one by size): by rows (one kernel; each row gathers its tiles' keys and sums
   the products on CUDA cores, tiles in ascending order), or by tiles (four small kernels: the rows'
   (row, tile) pairs are counted and placed by tile, so the pairs of one tile become neighbours; a
   program of 16 pairs loads each distinct tile among them once and scores it against all 16
   queries with one ``tl.dot``; each pair keeps its tile's best keys, and a row's tiles are merged
   in ascending order as splits are). On i.i.d. keys at Llama-8B shapes every tile is picked by
   about four rows, so by tiles reads about a quarter of the bytes.

Up to ``_SUBTILE_MAX_KEYS`` keys, phase 1 ranks the two halves of each tile (sub-tiles) instead of
whole tiles, so phase 2 reads half the keys; the argument below holds for any split of the keys into
consecutive runs.

Why the result is exact: let ``theta`` be the ``TOPK``-th best tile maximum of a row. ``TOPK``
distinct tiles hold a score ``>= theta``, so every key of the row's top-k scores ``>= theta`` and
lies in a tile whose maximum is ``>= theta``: one of those kept, except where maxima tie at
``theta``, and there the kept ones are the lowest tiles, which hold the lowest-index keys of that
score, the ones the tie rule prefers.

Phase 2 by rows sums its products in plain fp32 where one pass accumulates on tensor cores (and by
tiles with other tile shapes), so they may order two keys whose scores differ in the last bits
differently (1-2 rows of ~65K at Llama-8B shapes on random keys; fp64 agreed with two phases by rows
each time: benchmarks/probe_topk_rounding.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from reattention_kernels.dispatch import interpreting
from reattention_kernels.triton_ops import select
from reattention_kernels.triton_ops.arrivals import arrival_counts, last_arrival
from reattention_kernels.triton_ops.rows import group_rows, row_heads
from reattention_kernels.triton_ops.select import select_row

try:  # host-side tensor descriptors (TMA); Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

# Splits cover a multiple of this many keys (a multiple of every BN).
_SPLIT_ALIGN = 256
_MAX_SPLITS = 256
# Up to this many rows (query tokens x GQA group) the split merge runs one program per row.
_MERGE_ROW_PROGRAMS_MAX_ROWS = 8
# Prefill takes two phases from this many rows (query tokens x GQA group; H100,
# benchmarks/bench_topk_phases.py); fewer rows rarely improve, so one pass costs them little.
_TWO_PHASE_MIN_ROWS = 32
# above every tile index
_NO_TILE = tl.constexpr(2**30)


@triton.jit
def _pick_best(b_v, b_i, o_j, KP: tl.constexpr):
    """Best entry of each row of a (value, index) set ``[BM, KP]``: max value, then min index."""
    b_best = tl.max(b_v, 1)
    # a unique key per slot: empty slots share index -1 and are told apart by their column
    b_key = tl.where(b_v == b_best[:, None], b_i.to(tl.int64) * KP + o_j[None, :], 2**62)
    b_kmin = tl.min(b_key, 1)
    m_hit = b_key == b_kmin[:, None]
    b_idx = tl.where(b_best == float("-inf"), -1, tl.sum(tl.where(m_hit, b_i, 0), 1))
    return b_idx, m_hit


@triton.jit
def _empty_set(BM: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr):
    """Empty (value, index) sets ``[BM, KP]`` and their worst values ``[BM]``: padding slots
    (``j >= TOPK``) hold +inf so they are never the worst entry."""
    o_j = tl.arange(0, KP)
    b_v = tl.where(o_j[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([BM, KP], dtype=tl.float32)
    return b_v, tl.full([BM, KP], -1, dtype=tl.int32), tl.full([BM], float("-inf"), dtype=tl.float32)


@triton.jit
def _admit(
    b_s,
    b_ci,
    n0,
    b_v,
    b_i,
    b_kth,
    o_c,
    o_j,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BN: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Admit the candidates ``b_s [BM, BN]`` (visited in ascending index order among equal values)
    into the running sets ``b_v, b_i [BM, KP]``; their indices are ``b_ci`` or ``n0 + column``."""
    b_m = tl.max(b_s, 1)
    b_up = b_m > b_kth
    # a row gains at most TOPK keys per tile; an unrolled chain of guarded steps (rather than a
    # while loop) keeps the tile loop pipelinable
    for _ in tl.static_range(TOPK):
        if tl.max(b_up.to(tl.int32), 0) > 0:
            b_a = tl.min(tl.where(b_s == b_m[:, None], o_c[None, :], BN), 1)
            m_a = o_c[None, :] == b_a[:, None]
            if GATHER:
                b_ai = tl.sum(tl.where(m_a, b_ci, 0), 1)
            else:
                b_ai = n0 + b_a
            # replace the worst slot (min value, then max index) of every improving row
            b_wkey = tl.where(b_v == b_kth[:, None], b_i.to(tl.int64) * KP + o_j[None, :], -(2**62))
            m_w = (b_wkey == tl.max(b_wkey, 1)[:, None]) & b_up[:, None]
            b_v = tl.where(m_w, b_m[:, None], b_v)
            b_i = tl.where(m_w, b_ai[:, None], b_i)
            b_kth = tl.min(b_v, 1)
            b_s = tl.where(m_a, float("-inf"), b_s)
            b_m = tl.max(b_s, 1)
            b_up = b_m > b_kth
    return b_v, b_i, b_kth


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
def _keep_best(b_x, i_x, b_v, b_i, b_kth, o_j, KP: tl.constexpr):
    """Enter each row's value ``b_x [BM]`` (index ``i_x``, the same for all rows) into its set
    ``b_v, b_i [BM, KP]`` where it beats the worst entry ``b_kth``, replacing the worst value with the
    largest index: values come in ascending index order, so among equals the lowest indices stay."""
    # int32 keys: tile indices are far below 2**31 / KP
    b_wkey = tl.where(b_v == b_kth[:, None], b_i * KP + o_j[None, :], -(2**30))
    m_w = (b_wkey == tl.max(b_wkey, 1)[:, None]) & (b_x > b_kth)[:, None]
    b_v = tl.where(m_w, b_x[:, None], b_v)
    b_i = tl.where(m_w, i_x, b_i)
    return b_v, b_i, tl.min(b_v, 1)


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


@triton.jit
def _store_sorted(b_v, b_i, o_j, p_o, p_wv, m_r, TOPK: tl.constexpr, KP: tl.constexpr, VALUES: tl.constexpr):
    """Write each row's set best first: indices (int64, -1 for empty slots) and, if asked, values."""
    b_v = tl.where(o_j[None, :] < TOPK, b_v, float("-inf"))  # padding slots hold +inf
    for j in tl.static_range(TOPK):
        b_idx, m_hit = _pick_best(b_v, b_i, o_j, KP)
        if VALUES:
            tl.store(p_wv + j, tl.max(b_v, 1), mask=m_r)
            tl.store(p_o + j, b_idx, mask=m_r)
        else:
            tl.store(p_o + j, b_idx.to(tl.int64), mask=m_r)
        b_v = tl.where(m_hit, float("-inf"), b_v)
        b_i = tl.where(m_hit, 2**30, b_i)


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
    """Phase 1 of two (``TWO_PHASE``) or one pass, over one split of the keys. With ``TMA`` phase 1's
    full tiles come through ``k_desc``, a tensor descriptor of ``k`` ``[B, TK, H, D]`` with blocks
    ``[1, BN, 1, D]`` (Hopper's tensor memory accelerator: no address math, asynchronous copies).

    ``SELECT`` (one pass, split): the last program of a batch row to finish (`arrivals.last_arrival`
    on ``counter [B]``, zero before the launch and after it) merges the row's partial
    sets (`_merge_splits`, as the merge kernel does) and selects its blocks into ``sel [B, SW]`` and
    ``n_sel [B]`` (`select.select_row`: ``SK`` blocks of ``BS`` at most, positions plus ``s_offset``), so
    a decode step's scoring, merge and selection take one launch instead of three."""
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


@triton.jit
def _merge_splits(ws_v, ws_i, o_w, m_r, n_c, o_c, o_j, BR: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                  BC: tl.constexpr, CACHE: tl.constexpr = ""):  # fmt: skip
    """The best ``TOPK`` of the ``n_c`` candidates of each row (``ws[o_w + c]``, stored split after
    split, each split's best first): among equal values they come in ascending index order, as
    the admission rule needs. ``CACHE``: the loads' cache modifier (``.cg`` in the launch that wrote
    ``ws``: the other programs' sets are in the L2, not this SM's L1)."""
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
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_j = tl.arange(0, KP)
    n_c = NSPLIT * TOPK
    b_v, b_i = _merge_splits(ws_v, ws_i, (i_bh * R + o_r).to(tl.int64) * n_c, m_r, n_c, tl.arange(0, BC), o_j,
                             BR, TOPK, KP, BC)  # fmt: skip
    o_t, o_hq = row_heads(o_r, i_h, G)
    _store_sorted(b_v, b_i, o_j, o + i_b * stride_ob + o_t * stride_ot + o_hq * stride_oh, o, m_r, TOPK, KP, False)


@triton.jit(do_not_specialize=["TK", "R", "NSPLIT"])
def score_topk_fwd_kernel_rescore(
    q,
    k,
    ws_v,
    ws_i,
    o,
    shift,
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
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    DC: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    BN: tl.constexpr,
    SC: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """Phase 2: per row, rescore the keys of its ``TOPK`` best tiles (over all splits) exactly."""
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    if SHIFT:
        TK = TK + tl.load(shift).to(tl.int32)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_j = tl.arange(0, KP)
    o_u = tl.arange(0, SC)
    n_c = NSPLIT * TOPK
    # [BR, KP] tile indices, -1 where a row has fewer than TOPK tiles
    _, b_tiles = _merge_splits(ws_v, ws_i, (i_bh * R + o_r).to(tl.int64) * n_c, m_r, n_c, tl.arange(0, BC), o_j,
                             BR, TOPK, KP, BC)  # fmt: skip
    b_tiles = tl.where((o_j[None, :] < TOPK) & (b_tiles >= 0), b_tiles, _NO_TILE)
    o_t, o_hq = row_heads(o_r, i_h, G)
    p_q = q + i_b * stride_qb + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh
    k_base = k + i_b * stride_kb + i_h * stride_kh
    b_v, b_i, b_kth = _empty_set(BR, KP, TOPK)
    # tiles in ascending order: candidates equal to the threshold must come in index order
    # (runtime loops: unrolled, TOPK x D / DC copies of the admission chain take minutes to compile)
    for _ in range(TOPK):
        b_t = tl.min(b_tiles, 1)
        b_tiles = tl.where(b_tiles == b_t[:, None], _NO_TILE, b_tiles)
        m_t = b_t < _NO_TILE
        # the tile's keys, SC at a time ([BR, SC] key indices)
        for c0 in range(0, BN, SC):
            o_n = tl.where(m_t, b_t, 0)[:, None] * BN + c0 + o_u[None, :]
            m_n = m_r[:, None] & m_t[:, None] & (o_n < TK)
            b_s = tl.zeros([BR, SC], dtype=tl.float32)
            for d0 in range(0, D, DC):
                o_d = d0 + tl.arange(0, DC)
                b_q = tl.load(p_q + o_d[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
                p_k = k_base + o_n.to(tl.int64)[:, :, None] * stride_kt + o_d[None, None, :]
                b_k = tl.load(p_k, mask=m_n[:, :, None], other=0.0).to(tl.float32)
                b_s += tl.sum(b_q[:, None, :] * b_k, 2)
            b_s = tl.where(m_n, b_s, float("-inf"))
            b_v, b_i, b_kth = _admit(b_s, o_n, 0, b_v, b_i, b_kth, o_u, o_j, TOPK, KP, SC, True)
    _store_sorted(b_v, b_i, o_j, o + i_b * stride_ob + o_t * stride_ot + o_hq * stride_oh, o, m_r, TOPK, KP, False)


@triton.jit(do_not_specialize=["R", "NSPLIT", "NT1"])
def score_topk_fwd_kernel_tiles(
    ws_v,
    ws_i,
    keys,
    counts,
    ranks,
    R,
    NSPLIT,
    NT1,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Phase 2, step 1: each row's ``TOPK`` best tiles over all splits, in ascending order, as sort
    keys ``bh * NT1 + tile`` (``tile = NT1 - 1`` where a row has fewer tiles) at ``keys[bh, r, j]``,
    counted per key (``counts``, zeroed before) with each pair's place among its key's (``ranks``)."""
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_j = tl.arange(0, KP)
    n_c = NSPLIT * TOPK
    o_w = (i_bh * R + o_r).to(tl.int64)
    _, b_tiles = _merge_splits(ws_v, ws_i, o_w * n_c, m_r, n_c, tl.arange(0, BC), o_j, BR, TOPK, KP, BC)
    b_tiles = tl.where((o_j[None, :] < TOPK) & (b_tiles >= 0), b_tiles, _NO_TILE)
    p_o = keys + o_w * TOPK
    for j in tl.static_range(TOPK):
        # ascending: the merge of step 3 needs a row's candidates in index order among equal scores
        b_t = tl.min(b_tiles, 1)
        b_tiles = tl.where(b_tiles == b_t[:, None], _NO_TILE, b_tiles)
        b_key = i_bh * NT1 + tl.where(b_t < _NO_TILE, b_t, NT1 - 1).to(tl.int64)
        tl.store(p_o + j, b_key.to(keys.dtype.element_ty), mask=m_r)
        tl.store(ranks + o_w * TOPK + j, tl.atomic_add(counts + b_key, 1, mask=m_r, sem="relaxed"), mask=m_r)


@triton.jit(do_not_specialize=["NPAIR"])
def score_topk_fwd_kernel_place(keys, ranks, ends, sorted_keys, perm, NPAIR, BP: tl.constexpr):
    """Phase 2, step 2 (a counting sort's scatter): pair ``p`` goes to ``ends[key] - 1 - rank``, where
    ``ends`` is the inclusive prefix sum of the key counts, so pairs of one tile become neighbours."""
    o_p = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)
    m_p = o_p < NPAIR
    b_key = tl.load(keys + o_p, mask=m_p, other=0)
    b_pos = tl.load(ends + b_key, mask=m_p, other=1) - 1 - tl.load(ranks + o_p, mask=m_p, other=0)
    tl.store(sorted_keys + b_pos, b_key, mask=m_p)
    tl.store(perm + b_pos, o_p, mask=m_p)


@triton.jit
def _pair_tile(k, key, o_c, o_d, TK, NT1, stride_kb, stride_kt, stride_kh, H: tl.constexpr, SUB: tl.constexpr):
    """Keys ``[KB, D]`` of the tile of sort key ``key`` (``bh * NT1 + tile``), their first index and
    mask (the tile's ``SUB`` keys below ``TK``; none for a row's missing tiles or past the list)."""
    c_bh = key // NT1
    n0 = ((key % NT1) * SUB).to(tl.int32)  # a row's missing tiles (NT1 - 1) start past the keys
    # past the list's end (key 2**62) nothing is read
    m_n = (o_c < SUB) & ((n0 + o_c) < TK * (key < 2**62).to(tl.int32))
    p_k = k + (c_bh // H) * stride_kb + (c_bh % H) * stride_kh + (n0 + o_c).to(tl.int64)[:, None] * stride_kt
    return tl.load(p_k + o_d[None, :], mask=m_n[:, None], other=0.0), n0, m_n


@triton.jit(do_not_specialize=["TK", "R", "NPAIR", "NT1"])
def score_topk_fwd_kernel_rescore_tiles(
    q,
    k,
    keys,
    perm,
    ws_v,
    ws_i,
    shift,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    TK,
    R,
    NPAIR,
    NT1,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    W: tl.constexpr,
    SUB: tl.constexpr,
    KB: tl.constexpr,
    IEEE: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """Phase 2, step 2: ``W`` consecutive (row, tile) pairs of the sorted list per program. Each
    distinct tile among them is loaded once and scored against all ``W`` queries with one ``tl.dot``;
    each pair keeps the ``TOPK`` best keys of its own tile, written best first to
    ``ws[bh, r, j, :]`` (``j``: the tile's rank among the row's tiles)."""
    i_w = tl.program_id(0)
    if SHIFT:
        TK = TK + tl.load(shift).to(tl.int32)
    o_p = i_w.to(tl.int64) * W + tl.arange(0, W)
    m_p = o_p < NPAIR
    b_key = tl.where(m_p, tl.load(keys + o_p, mask=m_p, other=0).to(tl.int64), 2**62)
    # the pair's slot in ws: ((bh * R + r) * TOPK + j)
    b_pi = tl.load(perm + o_p, mask=m_p, other=0)
    o_bh = b_pi // (R * TOPK)
    o_t, o_hq = row_heads((b_pi // TOPK) % R, o_bh % H, G)
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, KB)
    o_j = tl.arange(0, KP)
    p_q = q + (o_bh // H) * stride_qb + o_t * stride_qt + o_hq * stride_qh
    b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_p[:, None], other=0.0)
    b_v, b_i, b_kth = _empty_set(W, KP, TOPK)
    cur = tl.min(b_key)
    b_k, n0, m_n = _pair_tile(k, cur, o_c, o_d, TK, NT1, stride_kb, stride_kt, stride_kh, H, SUB)
    while cur < 2**62:
        # the next tile's load is issued before this tile's scores are used, to overlap its latency
        nxt = tl.min(tl.where(b_key > cur, b_key, 2**62))
        b_kn, n0n, m_nn = _pair_tile(k, nxt, o_c, o_d, TK, NT1, stride_kb, stride_kt, stride_kh, H, SUB)
        # [W, KB]: only the pairs of this tile take its scores
        b_s = tl.where((b_key == cur)[:, None] & m_n[None, :], _qk(b_q, b_k, IEEE), float("-inf"))
        b_v, b_i, b_kth = _admit(b_s, b_s, n0, b_v, b_i, b_kth, o_c, o_j, TOPK, KP, KB, False)
        cur, b_k, n0, m_n = nxt, b_kn, n0n, m_nn
    _store_sorted(b_v, b_i, o_j, ws_i + b_pi * TOPK, ws_v + b_pi * TOPK, m_p, TOPK, KP, True)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 4
    # about two programs per SM: enough bytes in flight, and splits long enough for the early-out
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _key_splits(tk_grid: int, programs: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(splits, keys per split) of ``tk_grid`` keys for ``programs`` row-block programs: by default
    the whole number of splits that brings the programs nearest `_target_programs` (a wave of two per
    SM, not one and a half: the Llama-8B chunk's 128 row blocks took 1.11 ms in 2 splits against 1.15
    in 3 with TMA loads; benchmarks/probe_topk_splits.py), each a multiple of the split alignment long."""
    if splits is None:
        splits = min(max(1, (2 * _target_programs(device) + programs) // (2 * programs)), _MAX_SPLITS)
    align = 32 if interpreting() else _SPLIT_ALIGN
    splits = max(1, min(splits, triton.cdiv(tk_grid, align)))
    keys_per_split = triton.cdiv(triton.cdiv(tk_grid, splits), align) * align
    return triton.cdiv(tk_grid, keys_per_split), keys_per_split


def _config(rows: int, dtype: torch.dtype, d: int, two_phase: bool = False) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages): rows of the GQA group per program, keys per tile, for head dim ``d``.

    Measured on an H100: in one pass (benchmarks/bench_kernels.py --sweep) 64 x 128 tiles with 4
    warps beat 128-row tiles, whose extraction steps are taken whenever any of their rows improves;
    phase 1 of two phases has no such steps, and 128 x 64 tiles (half the key reads of 64 rows) with
    8 warps were fastest at most prefill shapes (benchmarks/bench_topk_phases.py); 256 rows were 5%
    faster from 4096 rows per KV head and slower below (benchmarks/probe_topk_rounding.py).
    """
    if interpreting():
        return (32 if two_phase else 16), 32, 4, 1
    if dtype == torch.float32:
        return min(64, max(16, triton.next_power_of_2(rows))), 32, 4, 2
    if two_phase:
        return (256 if rows >= 4096 else min(128, max(16, triton.next_power_of_2(rows)))), 64, 8, 3
    bm = min(64, max(16, triton.next_power_of_2(rows)))
    # decode at head dim 64: 256-key tiles keep a tile's bytes (32 KB) in flight per step, as 128 keys do at
    # head dim 128; a step costs about the same either way (H200, the embedded model at 1M keys: 0.115 against
    # 0.132 ms per layer; 128K: 0.033 against 0.037; benchmarks/probe_decode_tiles.py)
    return bm, (256 if d <= 64 and bm == 16 else 128), 4, 3


# Up to this many keys, phase 1 ranks two sub-tiles per tile by default.
_SUBTILE_MAX_KEYS = 32768


def _subtiles(keys: int, bn: int) -> int:
    """Phase 1's sub-tiles per tile by default when phase 2 rescores by rows (see `_tile_maxima`).

    Two halve phase 2's reads (each row rescores its best half tiles) but make phase 1 about a third
    slower (the reshaped row maxima). Phase 2's cost does not grow with the keys and phase 1's does,
    so two pay only on short ranges (H100: 4-12% faster up to 32K keys, slower from 64K;
    benchmarks/bench_topk_phases.py --subtiles, results/topk-subtiles-h100-83a1fcc.jsonl). By tiles,
    phase 2 reads each distinct tile once, and one sub-tile was faster (Llama-8B chunk at 32K keys:
    364 against 439 us; benchmarks/probe_topk_phase2.py --subtiles 1 2).
    """
    return 2 if keys <= _SUBTILE_MAX_KEYS and bn == 64 else 1


def _rescore_config(br: int, bn: int, d: int) -> tuple[int, int, int, int]:
    """Phase 2's (rows per program, keys per step, head dims per step, num_warps), with the merge
    kernel's ``br`` rows: a whole tile per step, 16 head dims at a time, was the best of those
    timed (benchmarks/bench_topk_phases.py)."""
    if interpreting():
        # several steps per tile and per head dim, so the tests cover the loops
        return br, min(bn, 16), min(d, 16), 4
    return br, bn, min(d, 16), 4


def _use_tma(k: torch.Tensor, bm: int, subtiles: int) -> bool:
    """Phase 1 reads key tiles through a TMA descriptor on Hopper and later GPUs, where the key view
    meets the descriptor's rules (16-byte aligned base and strides), for whole tiles of up to 128
    rows. H100 (benchmarks/probe_topk_phase2.py): phase 1 5.5% faster at the Llama-8B chunk (512 x
    128K keys) and 1% for the embedded model's, but 16% slower with half tiles (512 x 32K) and 1%
    with 256-row tiles (2048 x 128K). Not in the interpreter: the CPU tests force it."""
    if interpreting() or k.device.type != "cuda" or TensorDescriptor is None or subtiles != 1 or bm > 128:
        return False
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    size = k.element_size()
    return k.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in k.stride()[:-1]) and k.stride(-1) == 1


# Phase 2 rescores by tile from this many bytes of keys gathered by rows.
_TILES_MIN_BYTES = 256 << 20


def _rescore_by(gathered: int) -> str:
    """Phase 2's design for ``gathered`` bytes of keys (rows x top-k x tile keys x head dim x
    element size, what rescoring by rows reads). By tile it reads each distinct tile once per
    program instead, at a fixed cost of four more small kernels (H100, i.i.d. keys,
    benchmarks/probe_topk_phase2.py): by rows was faster up to 75 MB (the embedded model's chunks:
    28 against 33 us at 16K keys, 45 against 69 at 128K), by tile from 537 MB (Llama-8B's 512-token
    chunk: 185 against 92 us at 32K keys, 350 against 208 at 128K; 2048 tokens: 1202 against 434).

    The interpreter follows the same rule, so its tiny shapes take rows, as a GPU's small chunks do
    (by tile is several times slower there: it loops over each program's tiles in numpy); the
    tests ask for tiles by name."""
    return "tiles" if gathered >= _TILES_MIN_BYTES else "rows"


def _tile_rescore_config() -> tuple[int, int]:
    """Phase 2's (pairs per program, num_warps) when it rescores by tile: 16 pairs and 2 warps
    were the best or within 12% of it at the shapes of `_rescore_by` (benchmarks/probe_topk_phase2.py)."""
    if interpreting():
        return 16, 4
    return 16, 2


def _rescore_by_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    ws_v: torch.Tensor,
    ws_i: torch.Tensor,
    out: torch.Tensor,
    shift: torch.Tensor | None,
    top_k: int,
    tk: int,
    sub: int,
    br: int,
    bc: int,
    tile_rescore: tuple[int, int] | None,
) -> None:
    """Phase 2 by tile into ``out``, from phase 1's per-split tile sets ``ws_v, ws_i [B*H, R, NSPLIT,
    top_k]`` over tiles of ``sub`` keys: pick each row's tiles, place the pairs by tile (a counting
    sort), rescore, merge each row's tiles."""
    b, tq, hq, d = q.shape
    h = k.shape[2]
    g, rows, kp = hq // h, tq * (hq // h), triton.next_power_of_2(top_k)
    nt1 = triton.cdiv(k.shape[1], sub) + 1  # tiles, and one for "no tile"
    # (row, tile) pairs as sort keys bh * nt1 + tile, each row's tiles ascending
    key_dtype = torch.int32 if b * h * nt1 < 2**31 else torch.int64
    keys = torch.empty((b * h, rows, top_k), device=q.device, dtype=key_dtype)
    ranks = torch.empty((b * h, rows, top_k), device=q.device, dtype=torch.int32)
    counts = torch.zeros(b * h * nt1, device=q.device, dtype=torch.int32)
    score_topk_fwd_kernel_tiles[(triton.cdiv(rows, br), b * h)](
        ws_v, ws_i, keys, counts, ranks, rows, ws_v.shape[2], nt1, TOPK=top_k, KP=kp, BR=br, BC=bc, num_warps=4
    )
    # a counting sort by key: pairs of one tile become neighbours, so a program of phase 2 loads
    # each of its tiles once (the order among one tile's pairs does not matter)
    npair = keys.numel()
    sorted_keys = torch.empty(npair, device=q.device, dtype=key_dtype)
    perm = torch.empty(npair, device=q.device, dtype=torch.int64)
    bp = 1024
    score_topk_fwd_kernel_place[(triton.cdiv(npair, bp),)](
        keys, ranks, torch.cumsum(counts, 0, dtype=torch.int32), sorted_keys, perm, npair, BP=bp, num_warps=4
    )
    wp, twarps = tile_rescore or _tile_rescore_config()
    # each pair's best keys of its tile, at [bh, r, the tile's rank among the row's tiles, :]
    pv = torch.empty((b * h, rows, top_k, top_k), dtype=torch.float32, device=q.device)
    pi = torch.empty((b * h, rows, top_k, top_k), dtype=torch.int32, device=q.device)
    score_topk_fwd_kernel_rescore_tiles[(triton.cdiv(npair, wp),)](
        q, k, sorted_keys, perm, pv, pi, out if shift is None else shift,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), tk, rows, npair, nt1,
        H=h, G=g, D=d, TOPK=top_k, KP=kp, W=wp, SUB=sub, KB=max(sub, 16), IEEE=q.dtype == torch.float32,
        SHIFT=shift is not None, num_warps=twarps,
    )  # fmt: skip
    # each row's top_k tiles are now top_k "splits" of top_k candidates, ascending: the split merge
    score_topk_fwd_kernel_merge[(triton.cdiv(rows, br), b * h)](
        pv, pi, out, out.stride(0), out.stride(1), out.stride(2), rows, top_k, H=h, G=g, TOPK=top_k, KP=kp, BR=br,
        BC=triton.next_power_of_2(top_k * top_k), num_warps=4,
    )  # fmt: skip


# A decode step's scoring kernel can also merge its splits and select the blocks (its last program; see
# the scan kernel's ``SELECT``) where they fit, instead of the merge and `_select_small` as two more
# launches. Off until a GPU has timed it against them (`benchmarks/probe_decode_epilogues.py`, the
# engine's `bench_engine.py --epilogues off on`): it saves two launches per layer step but runs the
# selection in one program of the scan's warps, after its last split. Its results equal the separate
# kernels' (interpreter tests; the sm90 PTX takes the count with one thread after a barrier).
FUSE_DECODE_SELECTION = False


def _fused_selection(
    device: torch.device, b: int, rows: int, top_k: int, max_blocks: int, block_size: int, offset: int
):
    """``(constexprs, counter, sel, n_sel, K, W)`` of the scan's selecting epilogue for ``rows`` rows
    (KV heads x query tokens x group) per batch row of ``top_k`` hits each, or None where it does not
    fit: more hits than `select._select_small` takes, a ``[K, block]`` tile over the selection
    kernels' limit, or no arrival count to be had."""
    hrp, kp = triton.next_power_of_2(rows), triton.next_power_of_2(top_k)
    kk = min(max_blocks, rows * top_k)  # as `select.select_from_hits_triton` has it for rows x top_k hits
    skp, bsp = triton.next_power_of_2(max(kk, 1)), triton.next_power_of_2(block_size)
    if not FUSE_DECODE_SELECTION or hrp * kp > select.SMALL_HITS or kk < 1 or skp * bsp > select.MAX_TILE:
        return None
    counter = arrival_counts(device, b)  # one per batch row
    if counter is None:
        return None
    width = kk * block_size
    consts = {"HRP": hrp, "BC": 32 if interpreting() else 256, "SBLOCK": select._pad_block(width), "SKP": skp,
              "BS": block_size, "BSP": bsp}  # fmt: skip
    sel = torch.empty((b, width), dtype=torch.int64, device=device)
    n_sel = torch.empty((b,), dtype=torch.int64, device=device)
    return consts, counter, sel, n_sel, kk, width


def score_topk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    *,
    length: int | None = None,
    shift: torch.Tensor | None = None,
    splits: int | None = None,
    config: tuple[int, int, int, int] | None = None,
    two_phase: bool | None = None,
    rescore: tuple[int, int, int, int] | None = None,
    merge: tuple[int, int, int] | None = None,
    subtiles: int | None = None,
    rescore_by: str | None = None,
    tile_rescore: tuple[int, int] | None = None,
    tma: bool | None = None,
    select_args: tuple[int, int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`score_topk_triton` with optional forced key splits, (BM, BN, num_warps, num_stages), phases,
    phase 2's (rows per program, keys per step, head dims per step, num_warps) and the split
    merge's (rows per program, candidates per step, num_warps), and phase 1's sub-tiles per tile (1, 2
    or 4: phase 2 rescores a row's best sub-tiles of ``BN / subtiles`` keys), for tuning and tests.

    ``rescore_by`` picks phase 2: ``"tiles"`` (the (row, tile) pairs sorted by tile, each tile
    loaded once per program of ``W`` pairs and scored with one ``tl.dot``; ``tile_rescore = (W,
    num_warps)``) or ``"rows"`` (each row gathers its own tiles' keys, CUDA-core sums; ``rescore`` as
    above); by default `_rescore_by`. ``tma``: phase 1 loads full key tiles through a tensor
    descriptor (default: where `_use_tma` allows).

    By default prefill (more than one query token) takes two phases from ``_TWO_PHASE_MIN_ROWS``
    rows, decode one pass.

    ``select_args = (max_blocks, block_size, offset)``: where a decode step's selection fits in the
    scan's epilogue (`_fused_selection`), return its ``(sel, n_sel)`` instead of the hits (see
    `score_select_triton`)."""
    b, tq, hq, d = q.shape
    h = k.shape[2]
    # the grid covers every row of k; the kernel scores the first `length` (+ shift) of them
    tk_grid = k.shape[1]
    tk = tk_grid if length is None else length
    if not 0 <= tk <= tk_grid:
        raise ValueError(f"length {tk} is outside the {tk_grid} keys given")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if not 1 <= top_k <= 8:
        raise ValueError(f"top_k must be in [1, 8], got {top_k}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    g = hq // h
    if (tk == 0 and shift is None) or tk_grid == 0 or b == 0 or tq == 0:
        return torch.full((b, tq, hq, top_k), -1, dtype=torch.int64, device=q.device)
    # every slot is written by the kernels
    out = torch.empty((b, tq, hq, top_k), dtype=torch.int64, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)

    rows = tq * g
    auto = two_phase is None
    two_phase = tq > 1 and (interpreting() or rows >= _TWO_PHASE_MIN_ROWS) if auto else two_phase
    bm, bn, warps, stages = config or _config(rows, q.dtype, d, two_phase)
    if rescore_by is None:
        rescore_by = _rescore_by(b * h * tq * g * top_k * (bn // (subtiles or 1)) * d * q.element_size())
    if subtiles is None:
        subtiles = _subtiles(tk_grid, bn) if two_phase and rescore_by == "rows" else 1
    if rescore_by not in ("tiles", "rows"):
        raise ValueError(f"rescore_by must be 'tiles' or 'rows', got {rescore_by!r}")
    if subtiles not in (1, 2, 4) or bn % subtiles or (subtiles > 1 and not two_phase):
        raise ValueError(f"subtiles must be 1, 2 or 4, divide BN ({bn}) and come with two phases, got {subtiles}")
    n_m = triton.cdiv(rows, bm)
    splits, keys_per_split = _key_splits(tk_grid, b * h * n_m, q.device, splits)
    shift_arg = out if shift is None else shift

    kp = triton.next_power_of_2(top_k)
    ieee = q.dtype == torch.float32
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    o_args = (out.stride(0), out.stride(1), out.stride(2))
    # one pass (decode) never loads through a descriptor, so it skips the checks
    tma = two_phase and (_use_tma(k, bm, subtiles) if tma is None else tma)
    k_desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, bn, 1, d]) if tma else k
    consts = {
        "H": h, "G": g, "D": d, "TOPK": top_k, "KP": kp, "BM": bm, "BN": bn, "IEEE": ieee, "SHIFT": shift is not None,
        "TWO_PHASE": two_phase, "S": subtiles, "TMA": tma, "num_warps": warps, "num_stages": stages,
    }  # fmt: skip
    no_select = (out, out, out, 0, 0, 0)  # counter, sel, n_sel, SK, SW, s_offset: read only with SELECT
    if splits == 1 and not two_phase:
        score_topk_fwd_kernel_scan[(n_m, 1, b * h)](
            q, k, k_desc, out, out, out, shift_arg, *no_select[:3], *args, *o_args, tk, rows, 1, keys_per_split,
            *no_select[3:], SPLIT=False, **consts,
        )  # fmt: skip
        return out
    # each split's best (score, key) or, in two phases, (tile maximum, tile) per row
    ws_v = torch.empty((b * h, rows, splits, top_k), dtype=torch.float32, device=q.device)
    ws_i = torch.empty((b * h, rows, splits, top_k), dtype=torch.int32, device=q.device)
    fused = None if two_phase or select_args is None else _fused_selection(q.device, b, h * rows, top_k, *select_args)
    if fused is not None:
        # decode: the scan's last program merges the splits and selects the blocks (one launch, not three)
        sel_consts, counter, sel, n_sel, sk, sw = fused
        score_topk_fwd_kernel_scan[(n_m, splits, b * h)](
            q, k, k_desc, out, ws_v, ws_i, shift_arg, counter, sel, n_sel, *args, *o_args, tk, rows, splits,
            keys_per_split, sk, sw, select_args[2], SPLIT=True, SELECT=True, **sel_consts, **consts,
        )  # fmt: skip
        return sel, n_sel
    score_topk_fwd_kernel_scan[(n_m, splits, b * h)](
        q, k, k_desc, out, ws_v, ws_i, shift_arg, *no_select[:3], *args, *o_args, tk, rows, splits, keys_per_split,
        *no_select[3:], SPLIT=True, **consts,
    )  # fmt: skip
    bc = min(32 if interpreting() else 256, triton.next_power_of_2(splits * top_k))
    br = min(16, triton.next_power_of_2(rows))
    if two_phase and rescore_by == "tiles":
        _rescore_by_tiles(q, k, ws_v, ws_i, out, shift, top_k, tk, bn // subtiles, br, bc, tile_rescore)
        return out
    if two_phase:
        sub = bn // subtiles  # phase 1 ranked sub-tiles of this many keys
        br, sc, dc, rwarps = rescore or _rescore_config(br, sub, d)
        score_topk_fwd_kernel_rescore[(triton.cdiv(rows, br), b * h)](
            q, k, ws_v, ws_i, out, shift_arg, *args, *o_args, tk, rows, splits,
            H=h, G=g, D=d, DC=dc, TOPK=top_k, KP=kp, BR=br, BC=bc, BN=sub, SC=min(sc, sub), SHIFT=shift is not None,
            num_warps=rwarps,
        )  # fmt: skip
        return out
    if merge is None and rows <= _MERGE_ROW_PROGRAMS_MAX_ROWS:
        # decode: one program per row and up to 512 candidates per step halve the merge (6.1 -> 3.3 us
        # per layer for the embedded model at 1M keys; benchmarks/probe_decode_merge.py)
        merge = 1, min(32 if interpreting() else 512, triton.next_power_of_2(splits * top_k)), 4
    br, bc, merge_warps = merge or (br, bc, 4)
    score_topk_fwd_kernel_merge[(triton.cdiv(rows, br), b * h)](
        ws_v, ws_i, out, *o_args, rows, splits, H=h, G=g, TOPK=top_k, KP=kp, BR=br, BC=bc, num_warps=merge_warps
    )
    return out


def score_topk_triton(
    q: torch.Tensor, k: torch.Tensor, top_k: int, *, length: int | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact per-row, per-head top-k of raw ``q . k`` over all keys, fused (no score matrix).

    Args:
        q (torch.Tensor): pre-RoPE queries of shape ``[B, TQ, HQ, D]``, fp16/bf16/fp32.
        k (torch.Tensor): pre-RoPE keys of shape ``[B, TK, H, D]``; any strides with a contiguous
            last dim (e.g. the middle slice of the key store), ``HQ % H == 0``.
        top_k (int): keys kept per (row, query head), 1 to 8.
        length (int | None): score only the first ``length`` keys (default: all ``TK``).
        shift (torch.Tensor | None): int64 ``[1]`` on the device, added there to ``length`` (see
            `reattention_kernels.score_topk`); the grid covers all ``TK`` rows of ``k``.

    Returns:
        torch.Tensor: int64 ``[B, TQ, HQ, top_k]`` indices into ``TK``, best first (fp32 score
        descending, index ascending on ties), ``-1`` in slots beyond the scored keys.
    """
    return score_topk_fwd(q, k, top_k, length=length, shift=shift)


def score_select_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    max_blocks: int,
    block_size: int,
    offset: int = 0,
    *,
    length: int | None = None,
    shift: torch.Tensor | None = None,
    **tuning,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_topk_triton`, then `select.select_from_hits_triton` of each batch row's hits over a
    middle of ``length`` (+ ``shift``) keys of ``k``: ``(sel, n_sel)`` as that returns.

    With ``FUSE_DECODE_SELECTION`` on, a decode step whose hits `select._select_small` takes runs as
    one kernel: the scan's last program per batch row merges the splits and selects (``SELECT``);
    anything else takes the separate kernels. ``tuning``: `score_topk_fwd`'s keyword arguments (tests
    and probes)."""
    got = score_topk_fwd(q, k, top_k, length=length, shift=shift, select_args=(max_blocks, block_size, offset),
                         **tuning)  # fmt: skip
    if isinstance(got, tuple):
        return got
    middle_len = k.shape[1] if length is None else length
    return select.select_from_hits_triton(
        got.reshape(got.shape[0], -1), middle_len, max_blocks, block_size, offset, shift=shift,
        max_middle_len=k.shape[1],
    )  # fmt: skip
