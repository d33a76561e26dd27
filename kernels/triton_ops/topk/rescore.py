"""Phase 2 of prefill scoring: each row's best tiles from phase 1, rescored exactly.

By rows (`score_topk_fwd_kernel_rescore`): each row gathers its tiles' keys and sums the products
on CUDA cores. By tiles (`rescore_by_tiles`: four small kernels): the (row, tile) pairs are placed
by tile with a counting sort, each program loads each distinct tile among its ``W`` pairs once and
scores it against their queries with one ``tl.dot``, and the split merge merges each row's tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reattention_kernels.triton_ops.rows import row_heads
from reattention_kernels.triton_ops.topk import merge
from reattention_kernels.triton_ops.topk.merge import _merge_splits
from reattention_kernels.triton_ops.topk.scan import _qk
from reattention_kernels.triton_ops.topk.sets import _admit, _empty_set, _store_sorted

# above every tile index
_NO_TILE = tl.constexpr(2**30)


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
                             BR, TOPK, KP, BC, "")  # fmt: skip
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
    _, b_tiles = _merge_splits(ws_v, ws_i, o_w * n_c, m_r, n_c, tl.arange(0, BC), o_j, BR, TOPK, KP, BC, "")
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


def rescore_by_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    ws_v: torch.Tensor,
    ws_i: torch.Tensor,
    out: torch.Tensor,
    shift: torch.Tensor | None,
    top_k: int,
    tk: int,
    sub: int,
    bc: int,
    config: tuple[int, int, int, int],
) -> None:
    """Phase 2 by rows into ``out [B, TQ, HQ, top_k]``, from phase 1's per-split tile sets ``ws_v,
    ws_i [B*H, R, NSPLIT, top_k]`` over tiles of ``sub`` keys; ``config``: (rows per program, keys
    per step, head dims per step, num_warps)."""
    b, tq, hq, d = q.shape
    h = k.shape[2]
    g, rows = hq // h, tq * (hq // h)
    br, sc, dc, warps = config
    score_topk_fwd_kernel_rescore[(triton.cdiv(rows, br), b * h)](
        q, k, ws_v, ws_i, out, out if shift is None else shift, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2), tk, rows, ws_v.shape[2],
        H=h, G=g, D=d, DC=dc, TOPK=top_k, KP=triton.next_power_of_2(top_k), BR=br, BC=bc, BN=sub, SC=min(sc, sub),
        SHIFT=shift is not None, num_warps=warps,
    )  # fmt: skip


def rescore_by_tiles(
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
    tile_rescore: tuple[int, int],
) -> None:
    """Phase 2 by tile into ``out``, from phase 1's per-split tile sets ``ws_v, ws_i [B*H, R, NSPLIT,
    top_k]`` over tiles of ``sub`` keys: pick each row's tiles, place the pairs by tile (a counting
    sort), rescore, merge each row's tiles; ``tile_rescore``: (pairs per program, num_warps)."""
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
    wp, twarps = tile_rescore
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
    merge.score_topk_fwd_kernel_merge[(triton.cdiv(rows, br), b * h)](
        pv, pi, out, out.stride(0), out.stride(1), out.stride(2), rows, top_k, H=h, G=g, TOPK=top_k, KP=kp, BR=br,
        BC=triton.next_power_of_2(top_k * top_k), num_warps=4,
    )  # fmt: skip
