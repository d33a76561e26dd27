"""Reference block selection from top-k hits: votes, clip to ``max_blocks`` (ties: lower position),
widen to blocks, merge, keep original order; batched tensor ops, no host synchronisation. The
specification of `triton_ops.select` (kernels/README.md; `reattention_core.attention.selection` for context).
"""

from __future__ import annotations

import torch


def vote_and_clip(hits: torch.Tensor, middle_len: int, max_blocks: int) -> torch.Tensor:
    """Most-voted distinct hit positions.

    Args:
        hits (torch.Tensor): int64 ``[B, N]`` positions in ``[0, middle_len)``; ``-1`` = no hit.
        middle_len (int): length of the middle.
        max_blocks (int): positions to keep.

    Returns:
        torch.Tensor: int64 ``[B, min(max_blocks, N)]`` kept positions, ascending, padded at the
        end with ``middle_len`` (an out-of-range marker).
    """
    b, n = hits.shape
    if n == 0:
        return hits.new_empty((b, 0))
    ordered = hits.sort(dim=-1).values
    lo = torch.searchsorted(ordered, ordered, right=False)
    hi = torch.searchsorted(ordered, ordered, right=True)
    votes = hi - lo
    first = (torch.arange(n, device=hits.device) == lo) & (ordered >= 0)
    # unique key: more votes first, then the lower position
    key = torch.where(first, votes * (middle_len + 1) + (middle_len - ordered), torch.full_like(ordered, -1))
    top = key.topk(min(max_blocks, n), dim=-1)
    kept = ordered.gather(1, top.indices)
    kept = torch.where(top.values >= 0, kept, torch.full_like(kept, middle_len))
    return kept.sort(dim=-1).values


def expand_blocks(kept: torch.Tensor, block_size: int, middle_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen kept positions to blocks, merge overlaps, keep original order.

    Args:
        kept (torch.Tensor): int64 ``[B, K]`` ascending positions, padded with ``middle_len``.
        block_size (int): block width.
        middle_len (int): length of the middle; blocks are clipped to ``[0, middle_len)``.

    Returns:
        ``(sel, n_sel)``: int64 ``[B, K * block_size]`` ascending middle positions (entries at and
        beyond ``n_sel[b]`` are padding) and int64 ``[B]`` counts.
    """
    b, kk = kept.shape
    width = kk * block_size
    if kk == 0:
        return kept.new_zeros((b, 0)), kept.new_zeros((b,))
    half = block_size // 2
    offsets = torch.arange(block_size, device=kept.device)
    cand = (kept - half)[:, :, None] + offsets  # [B, K, block]
    ends = kept - half + block_size - 1
    prev_end = torch.cat([ends.new_full((b, 1), -1), ends[:, :-1]], dim=1).cummax(dim=1).values
    valid = (cand >= 0) & (cand < middle_len) & (cand > prev_end[:, :, None]) & (kept < middle_len)[:, :, None]
    cand, valid = cand.reshape(b, width), valid.reshape(b, width)
    n_sel = valid.sum(dim=-1)
    dest = torch.where(valid, valid.cumsum(dim=-1) - 1, torch.full_like(cand, width))
    sel = cand.new_zeros((b, width + 1)).scatter_(1, dest, cand)[:, :width]
    return sel, n_sel


def select_from_hits_ref(
    hits: torch.Tensor, middle_len: int, max_blocks: int, block_size: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions from top-k hits: `vote_and_clip`, then `expand_blocks`, then ``+ offset``.

    Args:
        hits (torch.Tensor): int64 ``[B, N]`` positions in ``[0, middle_len)``; ``-1`` = no hit.
        offset (int): added to every entry of ``sel`` (padding included), e.g. the sink length to
            turn middle positions into store positions.

    Returns:
        ``(sel, n_sel)``: int64 ``[B, min(max_blocks, N) * block_size]`` ascending positions
        (entries at and beyond ``n_sel[b]`` are padding, equal to ``offset``) and int64 ``[B]`` counts.
    """
    sel, n_sel = expand_blocks(vote_and_clip(hits, middle_len, max_blocks), block_size, middle_len)
    return sel + offset, n_sel
