"""One layer of ReAttention over a KV store whose sequence is split across ranks.

Every rank holds the same queries (all ranks run the whole model) and one contiguous shard
``[shard_start, shard_start + S)`` of the layer's pre-RoPE key/value store. The layer then runs
in three steps, each exact, so the output equals `reattention_core.attention.layer.reattention_attention`
on the whole store (up to float summation order):

1. **score** - each rank takes the per-(row, query head) top-k of its part of the middle and
   all-gathers them with their fp32 scores; every rank merges the candidates under the order
   *score descending, then position ascending* (the single-device tie rule). The global top-k is
   always among the per-rank top-k, so the merged hits are the single-device hits;
2. **select** - the hits vote and widen to blocks (`reattention_kernels.select_from_hits`),
   identically on every rank, so all ranks agree on the scope ``[sink | selected | local]`` and
   on its contiguous positions ``0 .. L-1``;
3. **attend** - each rank attends over the scope tokens it holds, with RoPE at their scope
   positions and the bottom-right causal limit, giving a partial output and its log-sum-exp;
   the partials are all-gathered and merged in rank order: ``o = sum_r exp(lse_r - lse) o_r``.

Two collectives per layer: one all-gather of ``[B, TQ, HQ, top_k]`` candidates, one of
``[B, TQ, HQ, D + 1]`` partial outputs. With no process group (or a world of one) no collective
runs, so the same code is the single-process path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from reattention_core.attention.layer import ScopePlan, no_selection, plan_scope
from reattention_core.config import ReAttentionConfig
from reattention_core.attention.rope import RopeSpec
from reattention_core.attention.selection import voting_rows
from reattention_kernels import KernelOptions, score_topk, select_from_hits
from reattention_kernels.reference import apply_rope_ref, rope_cos_sin


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_gather_stack(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``[W, *x.shape]``: ``x`` from every rank, in rank order (``[1, ...]`` without a group)."""
    n = world_size(group)
    if n == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def shard_candidates(
    q: torch.Tensor, k_middle: torch.Tensor, offset: int, top_k: int, *, kernel_options: KernelOptions | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's top-k middle keys per (row, query head), with their scores.

    Args:
        q: pre-RoPE queries ``[B, TQ, HQ, D]``.
        k_middle: this rank's part of the middle, ``[B, M, H, D]`` (``M`` may be 0).
        offset: middle position of ``k_middle``'s first key.

    Returns:
        ``(scores, positions)``: fp32 ``[B, TQ, HQ, top_k]`` (``-inf`` in empty slots) and int64
        middle positions (``-1`` in empty slots).
    """
    b, tq, hq = q.shape[:3]
    if k_middle.shape[1] == 0:
        return (q.new_full((b, tq, hq, top_k), float("-inf"), dtype=torch.float32),
                torch.full((b, tq, hq, top_k), -1, dtype=torch.int64, device=q.device))
    local = score_topk(q, k_middle, top_k, kernel_options=kernel_options)  # [B, TQ, HQ, top_k], -1 = none
    g = hq // k_middle.shape[2]
    # Score the few candidates again, in fp32, to rank them against the other ranks' candidates.
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hk = (torch.arange(hq, device=q.device) // g)[None, None, :, None]
    keys = k_middle[bi, local.clamp(min=0), hk]  # [B, TQ, HQ, top_k, D]
    scores = (keys.float() * q.float()[:, :, :, None, :]).sum(-1)
    valid = local >= 0
    return scores.masked_fill(~valid, float("-inf")), torch.where(valid, local + offset, local)


def merge_candidates(scores: torch.Tensor, positions: torch.Tensor, top_k: int) -> torch.Tensor:
    """Global top-k from all ranks' candidates ``[W, B, TQ, HQ, K]``: score desc, then position asc.

    Returns:
        int64 ``[B, TQ, HQ, top_k]`` middle positions, ``-1`` where the whole middle has fewer keys.
    """
    w, b, tq, hq, k = scores.shape
    s = scores.permute(1, 2, 3, 0, 4).reshape(b, tq, hq, w * k)
    p = positions.permute(1, 2, 3, 0, 4).reshape(b, tq, hq, w * k)
    order = p.argsort(dim=-1, stable=True)  # position ascending first, then a stable sort by score
    s, p = s.gather(-1, order), p.gather(-1, order)
    order = s.argsort(dim=-1, descending=True, stable=True)[..., :top_k]
    best_s, best_p = s.gather(-1, order), p.gather(-1, order)
    return torch.where(torch.isneginf(best_s), torch.full_like(best_p, -1), best_p)


def sharded_select(
    q: torch.Tensor,
    k: torch.Tensor,
    shard_start: int,
    plan: ScopePlan,
    cfg: ReAttentionConfig,
    *,
    group: dist.ProcessGroup | None = None,
    kernel_options: KernelOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected middle tokens (absolute positions, ascending) and their counts: ``([B, NS], [B])``."""
    b = q.shape[0]
    lo = max(plan.sink_len, shard_start)
    hi = min(plan.local_start, shard_start + k.shape[1])
    k_mid = k[:, lo - shard_start : max(lo, hi) - shard_start]
    scores, positions = shard_candidates(
        voting_rows(q, cfg.prefill_vote_stride), k_mid, lo - plan.sink_len, cfg.top_k,
        kernel_options=kernel_options,
    )  # fmt: skip
    packed = torch.stack([scores.double(), positions.double()], dim=-1)  # one collective for both
    gathered = all_gather_stack(packed, group)
    hits = merge_candidates(gathered[..., 0].float(), gathered[..., 1].long(), cfg.top_k)
    return select_from_hits(
        hits.reshape(b, -1), plan.middle_len, cfg.max_blocks, cfg.block_size, plan.sink_len,
        kernel_options=kernel_options,
    )  # fmt: skip


def partial_scope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard_start: int,
    plan: ScopePlan,
    sel: torch.Tensor,
    n_sel: torch.Tensor,
    rope: RopeSpec,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries over the scope tokens this shard holds.

    Scope positions follow `reattention_kernels.reference.attention`: sink ``t -> t``, the j-th
    selected token ``-> sink_len + j``, local token ``t -> sink_len + n_sel + (t - local_start)``;
    query ``i`` sees scope position ``j`` iff ``j <= L - TQ + i``.

    Returns:
        ``(o, lse)``: fp32 ``[B, TQ, HQ, D]`` normalised over this shard's keys (0 where it holds
        none a row may see) and fp32 ``[B, TQ, HQ]`` log-sum-exp of the scaled scores (``-inf``).
    """
    b, tq, hq, d = q.shape
    end = shard_start + k.shape[1]
    dev = q.device
    outs, lses = [], []
    for bi in range(b):
        ns = int(n_sel[bi])
        chosen = sel[bi, :ns]
        in_shard = (chosen >= shard_start) & (chosen < end)
        sink = _span(shard_start, min(plan.sink_len, end), dev)
        local = _span(max(plan.local_start, shard_start), min(plan.total, end), dev)
        tokens = torch.cat([sink, chosen[in_shard], local])
        pos = torch.cat([sink, plan.sink_len + in_shard.nonzero().flatten(), plan.sink_len + ns + local - plan.local_start])
        length = plan.sink_len + ns + plan.total - plan.local_start
        qpos = torch.arange(length - tq, length, device=dev)
        if tokens.numel() == 0:
            outs.append(q.new_zeros((tq, hq, d), dtype=torch.float32))
            lses.append(q.new_full((tq, hq), float("-inf"), dtype=torch.float32))
            continue
        cos, sin = rope_cos_sin(pos, rope.inv_freq, rope.attention_scaling, q.dtype)
        qcos, qsin = rope_cos_sin(qpos, rope.inv_freq, rope.attention_scaling, q.dtype)
        idx = tokens - shard_start
        g = hq // k.shape[2]
        kh = apply_rope_ref(k[bi, idx], cos, sin).float().repeat_interleave(g, dim=1).transpose(0, 1)  # [HQ, n, D]
        vh = v[bi, idx].float().repeat_interleave(g, dim=1).transpose(0, 1)
        qh = apply_rope_ref(q[bi], qcos, qsin).float().transpose(0, 1)  # [HQ, TQ, D]
        s = (qh @ kh.transpose(1, 2)) * scale  # [HQ, TQ, n]
        s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [HQ, TQ]
        p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])  # rows with no key: all 0
        outs.append((p @ vh).transpose(0, 1))
        lses.append(lse.transpose(0, 1))
    return torch.stack(outs), torch.stack(lses)


def _span(start: int, stop: int, device: torch.device) -> torch.Tensor:
    """``arange(start, stop)``, empty when ``stop <= start``."""
    return torch.arange(start, max(start, stop), device=device)


def merge_partials(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Exact softmax merge of per-rank partials ``o [W, ..., D]``, ``lse [W, ...]`` (fp32)."""
    top = lse.max(dim=0).values
    weight = torch.exp(lse - top.masked_fill(torch.isneginf(top), 0.0))  # [W, ...]; 0 for -inf parts
    total = weight.sum(dim=0)
    return (weight[..., None] * o).sum(dim=0) / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]


def sharded_reattention_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: ReAttentionConfig,
    rope: RopeSpec,
    scale: float,
    *,
    shard_start: int,
    total: int,
    group: dist.ProcessGroup | None = None,
    kernel_options: KernelOptions | None = None,
) -> torch.Tensor:
    """`reattention_attention` with the store's sequence split across the ranks of ``group``.

    Args:
        q: pre-RoPE queries ``[B, TQ, HQ, D]`` of the last ``TQ`` tokens (the same on every rank).
        k, v: this rank's shard ``[B, S, H, D]`` of the store: global tokens
            ``[shard_start, shard_start + S)``; shards are disjoint, contiguous and cover
            ``[0, total)`` together (a shard may be empty).
        total: tokens in the whole store (the same on every rank).
        cfg, rope, scale, kernel_options: as in `reattention_attention`.

    Returns:
        ``[B, TQ, HQ, D]`` in ``q.dtype``, the same on every rank.
    """
    plan = plan_scope(cfg, total, q.shape[1])
    if plan.select:
        sel, n_sel = sharded_select(q, k, shard_start, plan, cfg, group=group, kernel_options=kernel_options)
    else:
        sel, n_sel = no_selection(q.shape[0], q.device)
    o, lse = partial_scope_attention(q, k, v, shard_start, plan, sel, n_sel, rope, scale)
    packed = all_gather_stack(torch.cat([o, lse[..., None]], dim=-1), group)
    return merge_partials(packed[..., :-1], packed[..., -1]).to(q.dtype)
