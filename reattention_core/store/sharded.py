"""`ShardedKVStore`: a KV store whose sequence is split across the ranks of a process group.

Every rank runs the whole model and keeps the tokens it owns (`ShardLayout`); the attention step
(`ShardLayer`) scores, selects and attends in three exact steps with two collectives per layer, so the
output equals the single-device layer's up to float summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reattention_core.attention import LayerKV, ScopePlan, Selection
from reattention_core.attention.rope import RopeSpec
from reattention_core.attention.selection import select_from_middle_hits
from reattention_core.attention.step import LayerStep
from reattention_core.errors import InvalidInputError
from reattention_core.store.resident import ResidentStore
from reattention_kernels import KernelOptions, score_topk
from reattention_kernels.reference import apply_rope_ref, rope_cos_sin


@dataclass(frozen=True)
class ShardLayout:
    """Which global tokens one rank holds: ``[start, stop)`` (``stop=None``: to the end).

    Contiguous shards: rank ``r`` of ``W`` holds ``[r * P, (r + 1) * P)``, the last rank everything from
    ``(W - 1) * P`` on; `balanced` picks ``P`` from the expected length so the shards come out even.

    Args:
        rank, world: this rank and the number of ranks.
        tokens_per_rank: ``P``.
    """

    rank: int
    world: int
    tokens_per_rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world or self.tokens_per_rank < 1:
            raise InvalidInputError(
                f"bad shard layout: rank {self.rank} of {self.world}, {self.tokens_per_rank} per rank"
            )

    @classmethod
    def balanced(cls, expected_tokens: int, rank: int, world: int) -> ShardLayout:
        """Even shards for a sequence of about ``expected_tokens`` tokens."""
        return cls(rank, world, max(1, math.ceil(expected_tokens / world)))

    @property
    def start(self) -> int:
        return self.rank * self.tokens_per_rank

    @property
    def stop(self) -> int | None:
        return None if self.rank == self.world - 1 else self.start + self.tokens_per_rank


class ShardedKVStore:
    """This rank's shard of every layer's pre-RoPE keys and values, plus the global lengths (a `KVStore`).

    Args:
        num_layers: number of attention layers.
        layout: the tokens this rank holds.
        group: the process group whose ranks hold the other shards (default: the world).
    """

    def __init__(self, num_layers: int, layout: ShardLayout, group: dist.ProcessGroup | None = None) -> None:
        self.layout = layout
        self.local = ResidentStore(num_layers)
        self.num_layers = num_layers
        self.group = group
        self._global = [0] * num_layers

    def graph_steps(self) -> None:
        """None: every layer step runs collectives, which a recorded graph does not replay here."""
        return None

    def min_length(self) -> int:
        return min(self._global) if self._global else 0

    def layer(self, layer: int, *, shift: torch.Tensor | None = None) -> LayerKV:
        if shift is not None:
            raise RuntimeError("a sharded store runs no CUDA-graph steps (its graph_steps() is None)")
        keys, values = self.local.buffer_view(layer)
        return ShardLayer(keys, values, self.layout.start, self._global[layer], self.group)

    def reserve(self, tokens: int) -> None:
        """Room for a global sequence of ``tokens`` (only this rank's part is allocated)."""
        stop = self.layout.stop if self.layout.stop is not None else tokens
        self.local.reserve(max(0, min(tokens, stop) - self.layout.start))

    def length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` in the whole (global) sequence: what the model's positions count."""
        return self._global[layer]

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, *, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chunk ``[B, TQ, H, D]`` (the same on every rank); keep the owned part.

        Returns:
            this rank's shard ``(keys, values)`` ``[B, S, H, D]`` after the append (``S`` may be 0);
            it starts at global token `layout.start`.
        """
        if shift is not None:
            raise RuntimeError("a sharded store runs no CUDA-graph steps (its graph_steps() is None)")
        g0 = self._global[layer]
        g1 = g0 + k.shape[1]
        stop = self.layout.stop if self.layout.stop is not None else g1
        a, b = max(g0, self.layout.start), min(g1, stop)
        self._global[layer] = g1
        if b > a or self.local.capacity(layer) == 0:  # an empty append allocates the (empty) buffers
            a, b = (a, b) if b > a else (g0, g0)
            return self.local.append(layer, k[:, a - g0 : b - g0], v[:, a - g0 : b - g0])
        return self.local.buffer_view(layer)

    def truncate(self, tokens: int) -> None:
        self._global = [min(n, tokens) for n in self._global]
        self.local.truncate(max(0, tokens - self.layout.start))


@dataclass(frozen=True)
class ShardLayer:
    """One layer's shard on this rank, as the attention step reads it (a `reattention_core.attention.LayerKV`).

    The step: each rank all-gathers its per-(row, query head) top-k middle candidates with fp32 scores
    (``[B, TQ, HQ, top_k]``) and all merge them (score descending, then position ascending: the
    single-device tie rule); the hits vote into the same scope on every rank; each rank attends over
    the scope tokens it holds and the partial outputs with their log-sum-exp (``[B, TQ, HQ, D + 1]``)
    are all-gathered and merged in rank order. Without a group (or a world of one) no collective runs.

    Attributes:
        keys, values: this rank's shard ``[B, S, H, D]``: global tokens ``[shard_start, shard_start + S)``;
            the shards of a group are disjoint, contiguous and cover ``[0, total)`` (a shard may be empty).
        shard_start: the global position of the shard's first token.
        total: tokens in the whole sequence (the same on every rank).
        group: the process group (``None``: the world, or no collectives without one).
    """

    keys: torch.Tensor
    values: torch.Tensor
    shard_start: int
    total: int
    group: dist.ProcessGroup | None = None

    def select(self, q: torch.Tensor, plan: ScopePlan, step: LayerStep) -> Selection:
        """Every rank's top-k candidates, merged: the single-device hits, voted into blocks."""
        cfg, k = step.config, self.keys
        lo = max(plan.sink_len, self.shard_start)
        hi = min(plan.local_start, self.shard_start + k.shape[1])
        k_mid = k[:, lo - self.shard_start : max(lo, hi) - self.shard_start]
        scores, positions = shard_candidates(
            q, k_mid, lo - plan.sink_len, cfg.top_k, kernel_options=step.kernel_options
        )
        packed = torch.stack([scores.double(), positions.double()], dim=-1)  # one collective for both
        gathered = all_gather_stack(packed, self.group)
        hits = merge_candidates(gathered[..., 0].float(), gathered[..., 1].long(), cfg.top_k)
        return select_from_middle_hits(hits, plan, cfg, kernel_options=step.kernel_options)

    def attend(self, q: torch.Tensor, plan: ScopePlan, selection: Selection, step: LayerStep) -> torch.Tensor:
        """This rank's partial attention, merged with every other rank's by log-sum-exp."""
        o, lse = partial_scope_attention(
            q, self.keys, self.values, self.shard_start, plan, selection.sel, selection.n_sel, step.rope, step.scale
        )
        packed = all_gather_stack(torch.cat([o, lse[..., None]], dim=-1), self.group)
        return merge_partials(packed[..., :-1], packed[..., -1]).to(q.dtype)


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
        return (
            q.new_full((b, tq, hq, top_k), float("-inf"), dtype=torch.float32),
            torch.full((b, tq, hq, top_k), -1, dtype=torch.int64, device=q.device),
        )
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
        chosen_pos = plan.sink_len + in_shard.nonzero().flatten()
        pos = torch.cat([sink, chosen_pos, plan.sink_len + ns + local - plan.local_start])
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
