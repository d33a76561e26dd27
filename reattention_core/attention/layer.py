"""`reattention_attention`: one layer of ReAttention over keys and values wherever a store keeps them.

The layer plans the scope, lets the voting query rows select blocks of the middle, and attends over
``[sink | selected blocks | local window]`` with RoPE at contiguous positions; the keys and values are
read through the store's `LayerKV` (resident, offloaded or sharded). Framework-free, ``[B, T, H, D]``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from reattention_core.attention.scope import ScopePlan, Selection, no_selection, plan_scope, shiftable
from reattention_core.attention.selection import voting_rows
from reattention_core.attention.step import LayerStep, SelectionEvent
from reattention_kernels import scope_attention


class LayerKV(Protocol):
    """One layer's stored keys and values, as the attention step reads them."""

    @property
    def total(self) -> int:
        """Tokens stored, the step's own queries included (the host's count under a shift)."""
        ...

    def select(self, q: torch.Tensor, plan: ScopePlan, step: LayerStep) -> Selection:
        """Score the middle's keys with the voting rows ``q [B, TQ, HQ, D]`` (exact top-k per row and
        query head), vote and widen the hits to blocks (`reattention_core.attention.selection`)."""
        ...

    def attend(self, q: torch.Tensor, plan: ScopePlan, selection: Selection, step: LayerStep) -> torch.Tensor:
        """Attention of ``q [B, TQ, HQ, D]`` (the last ``TQ`` stored tokens) over ``[sink | selection |
        local window]``, RoPE at the scope positions, bottom-right causal: ``[B, TQ, HQ, D]``."""
        ...


def reattention_attention(q: torch.Tensor, kv: LayerKV, step: LayerStep) -> torch.Tensor:
    """ReAttention for one layer.

    Args:
        q (torch.Tensor): pre-RoPE queries ``[B, TQ, HQ, D]`` of the last ``TQ`` stored tokens.
        kv (LayerKV): the layer's keys and values (``KVStore.layer``).
        step (LayerStep): config, RoPE, scale, kernel settings and step context.

    Returns:
        torch.Tensor: ``[B, TQ, HQ, D]`` attention output.
    """
    cfg = step.config
    plan = plan_scope(cfg, kv.total, q.shape[1])
    if step.shift is not None and not shiftable(plan):
        raise ValueError("a scope without sink and local window (full attention) cannot be shifted")
    if not plan.select:
        return kv.attend(q, plan, no_selection(q.shape[0], q.device), step)
    rows = voting_rows(q, cfg.prefill_vote_stride)
    selection = kv.select(rows, plan, step)
    if step.observer is not None and selection.hits is not None:
        event = SelectionEvent(
            step.layer, plan, rows, selection.hits, selection.sel, selection.n_sel, selection.middle_keys
        )
        step.observer(event)
    return kv.attend(q, plan, selection, step)


def attend_scope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: Selection,
    step: LayerStep,
    *,
    sink_len: int,
    local_start: int,
    length: int | None = None,
) -> torch.Tensor:
    """`reattention_kernels.scope_attention` of ``q`` over ``k, v [B, T, H, D]`` on its device:
    ``[sink_len tokens | selection.sel | from local_start]`` with ``step``'s RoPE, scale, kernel settings
    and shift (``length``: the stored tokens ``k`` holds at recording time, for a shifted step)."""
    out, _ = scope_attention(
        q, k, v, selection.sel, selection.n_sel,
        sink_len=sink_len, local_start=local_start, inv_freq=step.rope.inv_freq,
        attention_scaling=step.rope.attention_scaling, scale=step.scale, kernel_options=step.kernel_options,
        length=length, shift=step.shift,
    )  # fmt: skip
    return out
