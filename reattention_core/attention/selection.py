"""Block selection: turn per-head top-k hits into the sorted token indices of the selected blocks.

Nothing here synchronises with the host, so on a GPU selection stays on the device
(`reattention_kernels.score_select`). The steps (votes, clip, blocks) are `select_blocks`'s doc; the
output is a padded index tensor plus a per-row count (`Selection`), the form the attention kernels read.
"""

from __future__ import annotations

import torch

from reattention_core.attention.scope import ScopePlan, Selection
from reattention_core.config import ReAttentionConfig
from reattention_kernels import KernelOptions, score_select, score_topk, select_from_hits
from reattention_kernels.reference.select import expand_blocks, vote_and_clip

__all__ = [
    "expand_blocks",
    "select_blocks",
    "select_from_middle_hits",
    "select_in_keys",
    "vote_and_clip",
    "voting_rows",
]


def voting_rows(q: torch.Tensor, stride: int) -> torch.Tensor:
    """The query rows of ``q [B, TQ, HQ, D]`` that vote: all of them for one row (decode) or
    ``stride`` 1, else rows ``TQ-1, TQ-1-stride, ...`` in order (a view, no copy). The chunk's last
    row always votes: at a prompt's end it is the question."""
    if q.shape[1] <= 1 or stride <= 1:
        return q
    return q[:, (q.shape[1] - 1) % stride :: stride]


def select_blocks(
    q: torch.Tensor,
    k_middle: torch.Tensor,
    *,
    top_k: int,
    max_blocks: int,
    block_size: int,
    offset: int = 0,
    kernel_options: KernelOptions | None = None,
    length: int | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-agnostic selection over the middle of one layer's pre-RoPE key store.

    Every hit ``(row, query head, slot)`` votes for its key position (only `voting_rows` with a
    prefill vote stride); the ``max_blocks`` most-voted positions are kept (ties: lower position
    first); each kept ``p`` becomes ``[p - block//2, p + ceil(block/2) - 1]``, clipped (not shifted) to
    the middle; overlapping blocks merge, and the result is sorted ascending (original order).

    Args:
        q (torch.Tensor): pre-RoPE queries ``[B, TQ, HQ, D]`` (all rows of the chunk vote).
        k_middle (torch.Tensor): pre-RoPE middle keys ``[B, M, H, D]``.
        top_k, max_blocks, block_size: see `ReAttentionConfig`.
        offset: added to the positions (the sink length gives positions in the store).
        length, shift: for a CUDA-graph step: the middle is the first ``length + shift[0]`` rows
            of ``k_middle`` (``shift`` an int64 ``[1]`` device tensor; see `reattention_kernels`).

    Returns:
        ``(sel, n_sel)`` as in `expand_blocks`, positions relative to the middle's start plus
        ``offset`` (padding entries equal ``offset``).
    """
    return score_select(
        q, k_middle, top_k, max_blocks, block_size, offset, length=length, shift=shift, kernel_options=kernel_options
    )


def select_in_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: ScopePlan,
    cfg: ReAttentionConfig,
    *,
    kernel_options: KernelOptions | None = None,
    shift: torch.Tensor | None = None,
    keep_hits: bool = False,
) -> Selection:
    """The selection for ``plan`` from a key store ``k [B, T, H, D]`` on the queries' device.

    Args:
        q: the voting query rows ``[B, TQ, HQ, D]`` (`voting_rows`).
        shift: a CUDA-graph step's shift: ``k`` is then the layer's whole key buffer and the middle
            ends ``shift[0]`` rows after ``plan.local_start``.
        keep_hits: score and select with the two separate ops and keep the hits and the middle's
            keys in the result (for an observer); the same selection as the fused op.
    """
    # shifted: the middle may grow up to the buffer's end less the local window
    end = plan.local_start if shift is None else k.shape[1] - (plan.total - plan.local_start)
    middle = k[:, plan.sink_len : end]
    length = None if shift is None else plan.middle_len
    if not keep_hits:
        sel, n_sel = select_blocks(
            q, middle, top_k=cfg.top_k, max_blocks=cfg.max_blocks, block_size=cfg.block_size, offset=plan.sink_len,
            kernel_options=kernel_options, length=length, shift=shift,
        )  # fmt: skip
        return Selection(sel, n_sel)
    hits = score_topk(q, middle, cfg.top_k, length=length, shift=shift, kernel_options=kernel_options)
    picked = select_from_middle_hits(
        hits, plan, cfg, kernel_options=kernel_options, shift=shift, max_middle_len=middle.shape[1]
    )
    return Selection(picked.sel, picked.n_sel, hits=hits, middle_keys=middle)


def select_from_middle_hits(
    hits: torch.Tensor,
    plan: ScopePlan,
    cfg: ReAttentionConfig,
    *,
    kernel_options: KernelOptions | None = None,
    shift: torch.Tensor | None = None,
    max_middle_len: int | None = None,
) -> Selection:
    """The selection for ``plan`` voted from top-k middle positions ``hits [B, TQ, HQ, top_k]`` (``-1``: none)."""
    sel, n_sel = select_from_hits(
        hits.reshape(hits.shape[0], -1), plan.middle_len, cfg.max_blocks, cfg.block_size, plan.sink_len,
        shift=shift, max_middle_len=max_middle_len, kernel_options=kernel_options,
    )  # fmt: skip
    return Selection(sel, n_sel, hits=hits)
