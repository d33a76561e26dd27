"""One layer of ReAttention: split the store, select blocks, attend over the scope with fresh RoPE.

This module is framework-free: plain tensors in ``[B, T, H, D]`` layout. The Hugging Face glue
(`reattention_core.hf`) only reshapes and calls `reattention_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reattention_core.config import ReAttentionConfig
from reattention_core.attention.rope import RopeSpec
from reattention_core.attention.selection import select_blocks, voting_rows
from reattention_kernels import KernelOptions, scope_attention


@dataclass(frozen=True)
class ScopePlan:
    """Where sink, middle and local window lie in a store of ``total`` tokens.

    ``middle_end == sink_len`` means there is no middle (everything is attended in place).
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
    return ScopePlan(
        sink_len=cfg.sink_size, local_start=total - local, total=total, select=cfg.mode == "reattention"
    )


def shiftable(plan: ScopePlan) -> bool:
    """Whether ``plan``'s scope keeps its length as the store grows (sink + middle + local window):
    the condition for recording a step once and replaying it with a shift."""
    return plan.local_start > 0


def no_selection(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sel, n_sel)`` of a scope without selected blocks: ``[B, 0]`` and ``[B]`` zeros."""
    return (torch.zeros((batch, 0), dtype=torch.int64, device=device),
            torch.zeros((batch,), dtype=torch.int64, device=device))


def select_for_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: ScopePlan,
    cfg: ReAttentionConfig,
    *,
    kernel_options: KernelOptions | None = None,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store positions ``(sel [B, NS], n_sel [B])`` selected for ``plan`` from the key store ``k``
    ``[B, T, H, D]`` (on the queries' device); none when the plan selects nothing.

    With ``shift`` (see `reattention_attention`), ``k`` is the layer's whole key buffer and the
    middle ends ``shift[0]`` rows after ``plan.local_start``.
    """
    if not plan.select:
        return no_selection(q.shape[0], q.device)
    # shifted: the middle may grow up to the buffer's end less the local window
    end = plan.local_start if shift is None else k.shape[1] - (plan.total - plan.local_start)
    return select_blocks(
        voting_rows(q, cfg.prefill_vote_stride), k[:, plan.sink_len : end], top_k=cfg.top_k,
        max_blocks=cfg.max_blocks, block_size=cfg.block_size, offset=plan.sink_len, kernel_options=kernel_options,
        length=None if shift is None else plan.middle_len, shift=shift,
    )  # fmt: skip


def reattention_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: ReAttentionConfig,
    rope: RopeSpec,
    scale: float,
    *,
    kernel_options: KernelOptions | None = None,
    total: int | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReAttention for one layer.

    A CUDA graph of a step (a decode step or a prefill chunk) records this call once and replays it as the store grows: it
    passes the layer's whole buffers as ``k`` and ``v``, the stored tokens at recording time as
    ``total`` and, in ``shift``, an int64 ``[1]`` device tensor holding how many tokens have been
    stored since. Only scopes with a sink and a local window can move that way (`shiftable`).

    Args:
        q (torch.Tensor): pre-RoPE queries ``[B, TQ, HQ, D]`` of the last ``TQ`` stored tokens.
        k (torch.Tensor): pre-RoPE key store ``[B, T, H, D]`` (including the queries' own keys).
        v (torch.Tensor): value store ``[B, T, H, D]``.
        cfg (ReAttentionConfig): sizes and mode.
        rope (RopeSpec): the model's rotary settings.
        scale (float): softmax scale.

    Returns:
        torch.Tensor: ``[B, TQ, HQ, D]`` attention output.
    """
    if shift is None:
        plan = plan_scope(cfg, k.shape[1], q.shape[1])
        sel, n_sel = select_for_plan(q, k, plan, cfg, kernel_options=kernel_options)
    else:
        assert total is not None, "a shifted step needs the stored tokens at recording time"
        plan = plan_scope(cfg, total, q.shape[1])
        if not shiftable(plan):
            raise ValueError("a scope without sink and local window (full attention) cannot be shifted")
        sel, n_sel = select_for_plan(q, k, plan, cfg, kernel_options=kernel_options, shift=shift)
    out, _ = scope_attention(
        q,
        k,
        v,
        sel,
        n_sel,
        sink_len=plan.sink_len,
        local_start=plan.local_start,
        inv_freq=rope.inv_freq,
        attention_scaling=rope.attention_scaling,
        scale=scale,
        kernel_options=kernel_options,
        length=None if shift is None else plan.total,
        shift=shift,
    )
    return out
