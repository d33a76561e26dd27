"""Fused block selection from top-k hits: votes, clip to ``max_blocks`` and blocks (kernels/README.md).

A row of few hits (a decode step) is selected in one program (`_select_small`: pairwise votes in
registers); more hits take the histogram path: `_count_votes`, `_tile_top` (repeated until one tile
of keys is left) and `_blocks`. Both give the reference's outputs bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reattention_kernels.dispatch import interpreting
from reattention_kernels.ops import _SELECT_MAX_TILE as MAX_TILE  # larger [K, block] tiles use the reference

# Most hits per program of the counting kernel and per tile of the top-key kernel.
_BLOCK = 1024
# Most hits per row that `_select_small` takes: its pairwise votes cost NP x NP compares in registers,
# cheaper than the histogram's four launches for a decode step's few dozen hits, far dearer for hundreds.
SMALL_HITS = 64
# Warps of `_select_small` and `_blocks`.
SMALL_WARPS = 8
BLOCKS_WARPS = 4


@triton.jit
def _count_votes(hits, counts, shift, stride_hb, N, M, MC, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
    i_n, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    if SHIFT:
        M = M + tl.load(shift)
    o = i_n * BLOCK + tl.arange(0, BLOCK)
    h = tl.load(hits + i_b * stride_hb + o, mask=o < N, other=-1)
    ok = (o < N) & (h >= 0) & (h < M)
    tl.atomic_add(counts + i_b * MC + h, tl.full([BLOCK], 1, tl.int32), mask=ok)


@triton.jit
def _tile_top(
    src,
    counts,
    dst,
    shift,
    stride_sb,
    N,
    M,
    MC,
    FROM_HITS: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
    SHIFT: tl.constexpr,
):
    """The ``KP`` largest keys of tile ``t`` of row ``b``, descending, into ``dst[b, t * KP:]``
    (``-1`` where the tile has fewer). ``FROM_HITS``: ``src`` holds hits, whose keys are made here."""
    i_t, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o = i_t * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    if FROM_HITS:
        if SHIFT:
            M = M + tl.load(shift)
        h = tl.load(src + i_b * stride_sb + o, mask=m, other=-1)
        ok = m & (h >= 0) & (h < M)
        c = tl.atomic_xchg(counts + i_b * MC + h, tl.zeros([BLOCK], tl.int32), mask=ok)
        # keys are encoded against MC (the histogram's row length, >= M): the same order for any M
        key = tl.where(ok & (c > 0), c.to(tl.int64) * (MC + 1) + (MC - h), -1)
    else:
        key = tl.load(src + i_b * stride_sb + o, mask=m, other=-1)
    top = tl.sort(key, descending=True)
    r = tl.arange(0, BLOCK)
    tl.store(dst + i_b * (tl.num_programs(0) * KP) + i_t * KP + r, top, mask=r < KP)


@triton.jit
def _exclusive_max(a_l, b_l, a_r, b_r):
    """Combine of an exclusive prefix maximum by `tl.associative_scan`: a run of values is summed up as
    ``(largest of all but its last value, its last value)``."""
    return tl.maximum(tl.maximum(a_l, b_l), a_r), b_r


@triton.jit
def _write_blocks(kept, sel, n_sel, i_b, M, K, W, offset, BLOCK: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr,
                  BSP: tl.constexpr):  # fmt: skip
    """Widen the kept positions ``kept [KP]`` (ascending; ``M`` in unused slots) of row ``i_b`` to
    blocks, merge each with the blocks before it and compact the result into ``sel`` and ``n_sel``.

    Block ``r`` is ``[p - BS//2, p - BS//2 + BS - 1]``, clipped to the middle and cut after the end
    of the blocks before it: one contiguous range ``[lo, hi]``, so its place in ``sel`` is the sum
    of the earlier ranges' lengths (a scan over ``KP`` values, not over every position)."""
    o_k = tl.arange(0, KP)
    start = kept - BS // 2
    ends = start + BS - 1
    # the latest end of the blocks before each: an exclusive prefix maximum in log2(KP) steps (a [KP, KP]
    # masked maximum spills registers at KP = 128)
    prev_end, _ = tl.associative_scan((tl.full([KP], -1, ends.dtype), ends), 0, _exclusive_max)
    lo = tl.maximum(tl.maximum(start, 0), prev_end + 1)
    hi = tl.minimum(ends, M - 1)
    row_n = tl.where((kept < M) & (o_k < K) & (hi >= lo), hi - lo + 1, 0)
    first = tl.cumsum(row_n, 0) - row_n
    o_s = tl.arange(0, BSP)
    tl.store(sel + i_b * W + first[:, None] + o_s[None, :], lo[:, None] + o_s[None, :] + offset,
             mask=o_s[None, :] < row_n[:, None])  # fmt: skip
    n = tl.sum(row_n, 0)
    tl.store(n_sel + i_b, n.to(tl.int64))
    # padding after the selected positions, as the reference has it
    o = tl.arange(0, BLOCK)
    for t in range(0, W, BLOCK):
        m = ((t + o) < W) & ((t + o) >= n)
        tl.store(sel + i_b * W + t + o, tl.zeros([BLOCK], tl.int64) + offset, mask=m)


@triton.jit
def _blocks(
    top,
    sel,
    n_sel,
    shift,
    M,
    MC,
    K,
    W,
    offset,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    SHIFT: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    if SHIFT:
        M = M + tl.load(shift)
    o_k = tl.arange(0, KP)
    best = tl.load(top + i_b * KP + o_k)  # descending; -1 for no position
    kept = tl.where((best >= 0) & (o_k < K), MC - best % (MC + 1), M)
    _write_blocks(tl.sort(kept), sel, n_sel, i_b, M, K, W, offset, BLOCK, KP, BS, BSP)


@triton.jit
def _clip_small(h, ok, K, M, KP: tl.constexpr, NP: tl.constexpr):
    """Votes and clip of a few hits in registers: the ``K`` most-voted distinct positions of
    ``h [NP]`` (only where ``ok``; ties: the lower position), ascending, ``M`` in the other slots of
    the ``[KP]`` result. Pairwise comparisons of all ``NP x NP`` hits take the histogram's place."""
    o_n = tl.arange(0, NP)
    h = h.to(tl.int32)  # positions < 2**31: half the registers of int64 in the NP x NP compares
    same = (h[:, None] == h[None, :]) & ok[:, None] & ok[None, :]
    votes = tl.sum(same.to(tl.int32), 1)
    first = ok & (tl.sum((same & (o_n[None, :] < o_n[:, None])).to(tl.int32), 1) == 0)
    # rank among the distinct positions: more votes first, then the lower position
    v_i, v_j, h_i, h_j = votes[:, None], votes[None, :], h[:, None], h[None, :]
    ahead = first[None, :] & ((v_j > v_i) | ((v_j == v_i) & (h_j < h_i)))
    keep = first & (tl.sum(ahead.to(tl.int32), 1) < K)
    # the kept positions in ascending order: each one's slot is the count of kept ones below it
    slot = tl.sum((keep[None, :] & (h[None, :] < h[:, None])).to(tl.int32), 1)
    o_k = tl.arange(0, KP)
    at = keep[None, :] & (slot[None, :] == o_k[:, None])
    kept = tl.sum(tl.where(at, h[None, :], 0), 1).to(tl.int64)
    return tl.where(tl.sum(at.to(tl.int32), 1) > 0, kept, M)


@triton.jit
def select_row(h, ok, sel, n_sel, i_b, M, K, W, offset, NP: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
               BS: tl.constexpr, BSP: tl.constexpr):  # fmt: skip
    """The whole selection of row ``i_b``'s hits ``h [NP]`` (only where ``ok``) in the calling program:
    votes and clip in registers, then the blocks into ``sel`` and ``n_sel``. `_select_small` and the
    decode scan's last program (``reattention_kernels.triton_ops.topk``, ``SELECT``) both end here."""
    kept = _clip_small(h, ok, K, M, KP, NP)
    _write_blocks(kept, sel, n_sel, i_b, M, K, W, offset, BLOCK, KP, BS, BSP)


@triton.jit
def _select_small(hits, sel, n_sel, shift, stride_hb, N, M, K, W, offset, NP: tl.constexpr, BLOCK: tl.constexpr,
                  KP: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, SHIFT: tl.constexpr):  # fmt: skip
    """The whole selection of one row of at most ``NP`` hits in one program (a decode step)."""
    i_b = tl.program_id(0).to(tl.int64)
    if SHIFT:
        M = M + tl.load(shift)
    o = tl.arange(0, NP)
    h = tl.load(hits + i_b * stride_hb + o, mask=o < N, other=-1)
    select_row(h, (o < N) & (h >= 0) & (h < M), sel, n_sel, i_b, M, K, W, offset, NP, BLOCK, KP, BS, BSP)


def _pad_block(width: int) -> int:
    return min(128 if interpreting() else _BLOCK, triton.next_power_of_2(width))


def select_from_hits_triton(
    hits: torch.Tensor,
    middle_len: int,
    max_blocks: int,
    block_size: int,
    offset: int = 0,
    *,
    shift: torch.Tensor | None = None,
    max_middle_len: int | None = None,
    small: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `select_from_hits_ref`: same inputs, bit-identical outputs.

    With ``small``, up to ``SMALL_HITS`` hits per row (a decode step) take one kernel
    (`_select_small`); more hits, or any number without ``small``, take the histogram, the tile
    reduction and `_blocks`.

    Args:
        hits (torch.Tensor): int64 ``[B, N]`` positions in ``[0, middle_len)``; ``-1`` = no hit.
        middle_len, max_blocks, block_size, offset: as in the reference.
        shift (torch.Tensor | None): int64 ``[1]`` on the device, added there to ``middle_len``.
        max_middle_len (int | None): bound of ``middle_len + shift`` (required with ``shift``).

    Returns:
        ``(sel, n_sel)``: int64 ``[B, min(max_blocks, N) * block_size]`` and int64 ``[B]``.
    """
    b, n = hits.shape
    kk = min(max_blocks, n)
    width = kk * block_size
    dev = hits.device
    if kk == 0 or b == 0:
        return torch.full((b, width), offset, dtype=torch.int64, device=dev), torch.zeros(
            (b,), dtype=torch.int64, device=dev
        )
    kp, bsp = triton.next_power_of_2(kk), triton.next_power_of_2(block_size)
    if kp * bsp > MAX_TILE:
        raise ValueError(f"max_blocks x block_size tile {kp}x{bsp} is over {MAX_TILE}; use the reference")
    if shift is None:
        mc = middle_len
    elif max_middle_len is None or max_middle_len < middle_len:
        raise ValueError("a shifted selection needs max_middle_len >= middle_len")
    else:
        mc = max_middle_len
    hits = hits.to(torch.int64).contiguous()
    shift_arg = hits if shift is None else shift  # any tensor: the kernels read it only with SHIFT
    sel = torch.empty((b, width), dtype=torch.int64, device=dev)
    n_sel = torch.empty((b,), dtype=torch.int64, device=dev)
    if small and n <= SMALL_HITS:
        np_ = triton.next_power_of_2(n)
        _select_small[(b,)](
            hits, sel, n_sel, shift_arg, hits.stride(0), n, middle_len, kk, width, offset, NP=np_,
            BLOCK=_pad_block(width), KP=kp, BS=block_size, BSP=bsp, SHIFT=shift is not None,
            num_warps=SMALL_WARPS,
        )  # fmt: skip
        return sel, n_sel
    counts = torch.zeros((b, max(mc, 1)), dtype=torch.int32, device=dev)
    most = 128 if interpreting() else _BLOCK
    block = min(most, triton.next_power_of_2(n))
    _count_votes[(triton.cdiv(n, block), b)](
        hits, counts, shift_arg, hits.stride(0), n, middle_len, mc, BLOCK=block, SHIFT=shift is not None
    )
    # tiles of hits -> each tile's KP best keys -> ... -> one row of the KP best keys
    src, length, from_hits = hits, n, True
    while True:
        block = max(kp, min(most, triton.next_power_of_2(length)))
        tiles = triton.cdiv(length, block)
        top = torch.empty((b, tiles * kp), dtype=torch.int64, device=dev)
        _tile_top[(tiles, b)](
            src, counts, top, shift_arg, src.stride(0), length, middle_len, mc, FROM_HITS=from_hits, BLOCK=block,
            KP=kp, SHIFT=shift is not None, num_warps=4 if block >= 512 else 1,
        )  # fmt: skip
        if tiles == 1:
            break
        src, length, from_hits = top, tiles * kp, False
    _blocks[(b,)](
        top, sel, n_sel, shift_arg, middle_len, mc, kk, width, offset, BLOCK=_pad_block(width),
        KP=kp, BS=block_size, BSP=bsp, SHIFT=shift is not None, num_warps=BLOCKS_WARPS,
    )  # fmt: skip
    return sel, n_sel
