"""Fused block selection from top-k hits: votes, clip and blocks in two launches.

The reference (`reattention_kernels.reference.select`) is about 25 small torch ops, two of them
sorts: about 1 ms of host time per layer step on an H100 host, more than the scoring kernel
itself (``benchmarks/profile_host.py``). Here:

1. ``_count_votes`` (one program per 1024 hits) adds every valid hit into a zeroed histogram
   ``[B, M]`` of int32 (atomics; M is the middle length, so 4 MB at 1M tokens).
2. ``_select`` (one program per batch row) takes each hit's count with an atomic exchange against
   0, so exactly one hit per distinct position reads it (and the histogram is left clean); its key
   is ``votes * (M + 1) + (M - position)``: unique, larger for more votes and, on ties, for the
   lower position (the reference's order). The ``K = min(max_blocks, N)`` largest keys are taken in
   K rounds (each the largest key below the previous one), sorted back to ascending positions,
   widened to blocks, merged with the blocks before them and compacted with prefix sums, exactly as
   the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reattention_kernels import _SELECT_MAX_TILE as MAX_TILE  # larger [K, block] tiles use the reference
from reattention_kernels.dispatch import interpreting

# Hits per program of the counting kernel and per tile of the selection kernel.
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
def _select(
    hits,
    counts,
    keys,
    sel,
    n_sel,
    shift,
    stride_hb,
    stride_sb,
    N,
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
    o = tl.arange(0, BLOCK)
    # keys are encoded against MC (the histogram's row length, >= M): the same order for any M
    m1 = MC + 1
    # keys: one per distinct position (the hit that takes the count), -1 for the others
    for t in range(0, N, BLOCK):
        m = (t + o) < N
        h = tl.load(hits + i_b * stride_hb + t + o, mask=m, other=-1)
        ok = m & (h >= 0) & (h < M)
        c = tl.atomic_xchg(counts + i_b * MC + h, tl.zeros([BLOCK], tl.int32), mask=ok)
        key = tl.where(ok & (c > 0), c.to(tl.int64) * m1 + (MC - h), -1)
        tl.store(keys + i_b * N + t + o, key, mask=m)
    tl.debug_barrier()
    # clip: the K largest keys, one round each (keys are unique, so "largest below the last")
    o_k = tl.arange(0, KP)
    kept = tl.full([KP], 0, tl.int64) + M
    prev = tl.full([], 2**62, tl.int64)
    for r in range(K):
        best = tl.full([], -1, tl.int64)
        for t in range(0, N, BLOCK):
            kt = tl.load(keys + i_b * N + t + o, mask=(t + o) < N, other=-1)
            best = tl.maximum(best, tl.max(tl.where(kt < prev, kt, -1), 0))
        pos = tl.where(best >= 0, MC - best % m1, M)
        kept = tl.where(o_k == r, pos, kept)
        prev = best
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
    tl.store(sel + i_b * stride_sb + dest, cand + offset, mask=valid)
    n = tl.sum(row_n, 0)
    tl.store(n_sel + i_b, n.to(tl.int64))
    # padding after the selected positions, as the reference has it
    for t in range(0, W, BLOCK):
        m = ((t + o) < W) & ((t + o) >= n)
        tl.store(sel + i_b * stride_sb + t + o, tl.zeros([BLOCK], tl.int64) + offset, mask=m)


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
    keys = torch.empty((b, n), dtype=torch.int64, device=dev)
    sel = torch.empty((b, width), dtype=torch.int64, device=dev)
    n_sel = torch.empty((b,), dtype=torch.int64, device=dev)
    block = 128 if interpreting() else _BLOCK
    _count_votes[(triton.cdiv(n, block), b)](
        hits, counts, shift_arg, hits.stride(0), n, middle_len, mc, BLOCK=block, SHIFT=shift is not None
    )
    _select[(b,)](
        hits, counts, keys, sel, n_sel, shift_arg, hits.stride(0), sel.stride(0), n, middle_len, mc, kk, width,
        offset, BLOCK=block, KP=kp, BS=block_size, BSP=bsp, SHIFT=shift is not None, num_warps=4,
    )  # fmt: skip
    return sel, n_sel
