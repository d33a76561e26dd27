"""Where a layer's scope lies in its store: sink, middle (where blocks are selected), local window.

Framework-free: plain tensors in ``[B, T, H, D]`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reattention_core.config import ReAttentionConfig


@dataclass(frozen=True)
class ScopePlan:
    """Where sink, middle and local window lie in a store of ``total`` tokens.

    ``local_start == sink_len`` means there is no middle (everything is attended in place).
    """

    sink_len: int
    local_start: int
    total: int
    select: bool

    @property
    def middle_len(self) -> int:
        return self.local_start - self.sink_len


def plan_scope(cfg: ReAttentionConfig, total: int, num_queries: int) -> ScopePlan:
    """Split a store of ``total`` tokens (the last ``num_queries`` are the queries).

    With ``mode="full"``, or while everything fits in sink + local window, the scope is the
    whole store at its original positions, i.e. plain causal attention.
    """
    # A chunk longer than the local window would push its own first queries into the middle.
    local = max(cfg.local_window, num_queries)
    if cfg.mode == "full" or total <= cfg.sink_size + local:
        return ScopePlan(sink_len=0, local_start=0, total=total, select=False)
    return ScopePlan(sink_len=cfg.sink_size, local_start=total - local, total=total, select=cfg.mode == "reattention")


def shiftable(plan: ScopePlan) -> bool:
    """Whether ``plan``'s scope keeps its length as the store grows (sink + middle + local window):
    the condition for recording a step once and replaying it with a shift."""
    return plan.local_start > 0


@dataclass(frozen=True)
class Selection:
    """The middle's tokens a layer step attends to, as the attention kernels read them.

    Attributes:
        sel: int64 ``[B, NS]`` store positions, ascending; entries at and beyond ``n_sel[b]`` are padding.
        n_sel: int64 ``[B]`` valid entries per row.
        hits: int64 ``[B, TQ, HQ, top_k]`` top-k middle positions (``-1``: none) the blocks were voted
            from; only for an observed step (`reattention_core.attention.step.LayerStep.observer`).
        middle_keys: the middle's pre-RoPE keys ``[B, M, H, D]`` those hits index, where the store holds
            them as one tensor on the queries' device; only for an observed step.
    """

    sel: torch.Tensor
    n_sel: torch.Tensor
    hits: torch.Tensor | None = None
    middle_keys: torch.Tensor | None = None


def no_selection(batch: int, device: torch.device) -> Selection:
    """The selection of a scope without selected blocks: ``[B, 0]`` and ``[B]`` zeros."""
    empty = torch.zeros((batch, 0), dtype=torch.int64, device=device)
    return Selection(empty, torch.zeros((batch,), dtype=torch.int64, device=device))
