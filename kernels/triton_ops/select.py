"""Fused block selection from top-k hits: votes, clip and blocks in a few launches.

The reference (`reattention_kernels.reference.select`) is about 25 small torch ops, two of them
sorts: about 1 ms of host time per layer step on an H100 host, more than the scoring kernel
itself (``benchmarks/profile_host.py``). Here:

1. ``_count_votes`` (one program per tile of hits) adds every valid hit into a zeroed histogram
   ``[B, M]`` of int32 (atomics; M is the middle length, so 4 MB at 1M tokens).
2. ``_tile_top`` (one program per tile) takes each hit's count with an atomic exchange against 0,
   so exactly one hit per distinct position reads it (and the histogram is left clean); its key is
   ``votes * (M + 1) + (M - position)``: unique, larger for more votes and, on ties, for the lower
   position (the reference's order). The program sorts its tile's keys and keeps the ``KP`` largest.
   While more than one tile's worth of kept keys remains, the same kernel reduces them again
   (a 256-token chunk of the embedded preset: 9216 hits, 9 tiles, then one).
3. ``_blocks`` (one program per batch row) turns the ``K = min(max_blocks, N)`` largest keys into
   positions, sorts them back to ascending order, widens them to blocks, merges each with the
   blocks before it and compacts the result with prefix sums, exactly as the reference does.

The clip used to be K rounds of "largest key below the last" over all N keys in one program:
K x N/1024 dependent passes, 0.15 ms per layer step of a prefill chunk (23% of a chunk's GPU time
at 128K tokens, ``benchmarks/profile_graphs.py``); the tiles now sort in parallel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reattention_kernels import _SELECT_MAX_TILE as MAX_TILE  # larger [K, block] tiles use the reference
from reattention_kernels.dispatch import interpreting

# Most hits per program of the counting kernel and per tile of the top-key kernel.
_BLOCK = 1024


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
    src, counts, dst, shift, stride_sb, N, M, MC, FROM_HITS: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
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
def _blocks(
    top, sel, n_sel, shift, M, MC, K, W, offset, BLOCK: tl.constexpr, KP: tl.constexpr, BS: tl.constexpr,
    BSP: tl.constexpr, SHIFT: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    if SHIFT:
        M = M + tl.load(shift)
    o_k = tl.arange(0, KP)
    best = tl.load(top + i_b * KP + o_k)  # descending; -1 for no position
    kept = tl.where((best >= 0) & (o_k < K), MC - best % (MC + 1), M)
    kept = tl.sort(kept)
    # blocks: [p - BS//2, p - BS//2 + BS - 1], clipped to the middle, merged with earlier blocks
    o_s = tl.arange(0, BSP)
    start = kept - BS // 2
    cand = start[:, None] + o_s[None, :]
    ends = start + BS - 1
    before = o_k[None, :] < o_k[:, None]
    prev_end = tl.max(tl.where(before, ends[None, :], -1), 1)
    row_ok = (kept < M) & (o_k < K)
    valid = (cand >= 0) & (cand < M) & (cand > prev_end[:, None]) & row_ok[:, None] & (o_s < BS)[None, :]
    vi = valid.to(tl.int32)
    row_n = tl.sum(vi, 1)
    dest = (tl.cumsum(row_n, 0) - row_n)[:, None] + tl.cumsum(vi, 1) - vi
    tl.store(sel + i_b * W + dest, cand + offset, mask=valid)
    n = tl.sum(row_n, 0)
    tl.store(n_sel + i_b, n.to(tl.int64))
    # padding after the selected positions, as the reference has it
    o = tl.arange(0, BLOCK)
    for t in range(0, W, BLOCK):
        m = ((t + o) < W) & ((t + o) >= n)
        tl.store(sel + i_b * W + t + o, tl.zeros([BLOCK], tl.int64) + offset, mask=m)


def select_from_hits_triton(
    hits: torch.Tensor,
    middle_len: int,
    max_blocks: int,
    block_size: int,
    offset: int = 0,
    *,
    shift: torch.Tensor | None = None,
    max_middle_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `select_from_hits_ref`: same inputs, bit-identical outputs.

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
    counts = torch.zeros((b, max(mc, 1)), dtype=torch.int32, device=dev)
    shift_arg = hits if shift is None else shift  # any tensor: the kernels read it only with SHIFT
    sel = torch.empty((b, width), dtype=torch.int64, device=dev)
    n_sel = torch.empty((b,), dtype=torch.int64, device=dev)
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
        top, sel, n_sel, shift_arg, middle_len, mc, kk, width, offset, BLOCK=min(most, triton.next_power_of_2(width)),
        KP=kp, BS=block_size, BSP=bsp, SHIFT=shift is not None, num_warps=4,
    )  # fmt: skip
    return sel, n_sel
