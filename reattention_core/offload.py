"""Exact selection over an offloaded middle: per-block key bounds on the device, keys fetched on demand.

When the key store does not fit on the GPU, the middle's keys live in host memory (pinned, or
memory-mapped pages of the persistent cache). The selection still needs, per query row and query
head, the exact top-k of ``q . k`` over all of them (`reattention_kernels.score_topk`). This module
gets that result while reading only a few blocks:

* `KeyBounds`: per block of ``S`` tokens and per KV head, the elementwise minimum and maximum of the
  pre-RoPE keys (``2 * D`` numbers per block and head, ``2 / S`` of the keys' size), kept on the
  device and updated as tokens are appended.
* For a query ``q``, ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` bounds the score of every key of the
  block from above (the bound of Quest, Tang et al. 2024).
* `candidate_topk` fetches the ``budget`` blocks with the highest bound (over all rows and heads
  of the chunk), scores them exactly with the same top-k op as the resident path, and then, with
  ``refine=True``, checks every block it did not fetch: if any could still hold a key that ranks
  at or above a row's k-th hit (its bound, plus a margin for fp32 rounding, reaches that score),
  those blocks are fetched too, until no row can change. The result is then identical to the
  top-k over the whole middle (the tests check it bit for bit, ties included); ``refine=False``
  stops after the first fetch (an approximation whose accuracy cost the evaluation harness
  measures).

Shapes: queries ``[B, TQ, HQ, D]``, keys ``[B, M, H, D]``, ``HQ = G * H``; bounds ``[B, NB, H, D]``
with ``NB = ceil(M / S)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reattention_kernels import score_topk

# fp32 rounding of a D-term dot product is far below this share of sum_d |q_d| * max|k_d|.
_MARGIN = 1e-4


class KeyBounds:
    """Elementwise min/max of the keys of each block of ``block`` tokens, per batch row and KV head.

    Args:
        block: tokens per block (the unit fetched from host memory).
        device: where the bounds live (the queries' device).
    """

    def __init__(self, block: int, device: torch.device | str) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = block
        self.device = torch.device(device)
        self.kmin: torch.Tensor | None = None  # [B, NB, H, D] fp32
        self.kmax: torch.Tensor | None = None
        self.tokens = 0

    @classmethod
    def of(cls, keys: torch.Tensor, block: int, device: torch.device | str | None = None) -> KeyBounds:
        """Bounds of ``keys`` ``[B, M, H, D]``, built in one go."""
        bounds = cls(block, keys.device if device is None else device)
        bounds.append(keys)
        return bounds

    def append(self, keys: torch.Tensor) -> None:
        """Extend the bounds with the next tokens ``[B, T, H, D]`` (any device, any chunking)."""
        t = keys.shape[1]
        if t == 0:
            return
        k = keys.to(self.device, torch.float32)
        s = self.block
        start = self.tokens
        first_block, last_block = start // s, (start + t - 1) // s
        nb = last_block + 1
        b, _, h, d = k.shape
        if self.kmin is None:
            self.kmin = torch.full((b, nb, h, d), float("inf"), device=self.device)
            self.kmax = torch.full((b, nb, h, d), float("-inf"), device=self.device)
        elif self.kmin.shape[1] < nb:
            grow = nb - self.kmin.shape[1]
            self.kmin = torch.cat([self.kmin, self.kmin.new_full((b, grow, h, d), float("inf"))], 1)
            self.kmax = torch.cat([self.kmax, self.kmax.new_full((b, grow, h, d), float("-inf"))], 1)
        assert self.kmax is not None
        # pad the chunk to whole blocks (padding never wins a min or a max), then reduce per block
        lead = start - first_block * s
        total = (last_block - first_block + 1) * s
        lo = k.new_full((b, total, h, d), float("inf"))
        hi = k.new_full((b, total, h, d), float("-inf"))
        lo[:, lead : lead + t] = k
        hi[:, lead : lead + t] = k
        span = slice(first_block, last_block + 1)
        lo = lo.view(b, -1, s, h, d).amin(2)
        hi = hi.view(b, -1, s, h, d).amax(2)
        self.kmin[:, span] = torch.minimum(self.kmin[:, span], lo)
        self.kmax[:, span] = torch.maximum(self.kmax[:, span], hi)
        self.tokens += t

    @property
    def num_blocks(self) -> int:
        return 0 if self.kmin is None else self.kmin.shape[1]

    def upper_bounds(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block score bounds and rounding margins for queries ``[B, TQ, HQ, D]``: ``[B, TQ, HQ, NB]`` each."""
        if self.kmin is None or self.kmax is None:
            raise ValueError("no keys yet")
        b, tq, hq, d = q.shape
        h = self.kmin.shape[2]
        g = hq // h
        qf = q.to(self.device, torch.float32).view(b, tq, h, g, d)
        pos, neg = qf.clamp(min=0), qf.clamp(max=0)
        # [B, TQ, H, G, NB]: sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin
        ub = torch.einsum("bthgd,bnhd->bthgn", pos, self.kmax) + torch.einsum("bthgd,bnhd->bthgn", neg, self.kmin)
        mag = torch.maximum(self.kmax.abs(), self.kmin.abs())
        margin = _MARGIN * torch.einsum("bthgd,bnhd->bthgn", qf.abs(), mag) + 1e-30
        return ub.reshape(b, tq, hq, -1), margin.reshape(b, tq, hq, -1)


@dataclass(frozen=True)
class CandidateResult:
    """``hits``: int64 ``[B, TQ, HQ, top_k]`` as `score_topk` returns them; ``fetched``: blocks read."""

    hits: torch.Tensor
    fetched: int
    rounds: int


def candidate_topk(
    q: torch.Tensor,
    keys: torch.Tensor,
    bounds: KeyBounds,
    top_k: int,
    *,
    budget: int,
    refine: bool = True,
    backend: str | None = None,
) -> CandidateResult:
    """Top-k keys of ``q`` over ``keys`` (host or device) reading only candidate blocks.

    Args:
        q: pre-RoPE queries ``[B, TQ, HQ, D]`` on the compute device.
        keys: pre-RoPE middle keys ``[B, M, H, D]`` (e.g. pinned host memory); ``bounds`` must
            cover exactly these ``M`` tokens.
        budget: blocks fetched first (the highest bounds over all rows and heads).
        refine: fetch more blocks until the result equals the full top-k (see the module doc).

    Returns:
        `CandidateResult` whose ``hits`` equal ``score_topk(q, keys, top_k)`` when ``refine``.
    """
    m = keys.shape[1]
    if bounds.tokens != m:
        raise ValueError(f"the bounds cover {bounds.tokens} tokens, the keys {m}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    b, tq, hq, _ = q.shape
    s, nb = bounds.block, bounds.num_blocks
    ub, margin = bounds.upper_bounds(q)
    fetched = torch.zeros(nb, dtype=torch.bool, device=ub.device)
    first = ub.amax(dim=(0, 1, 2)).topk(min(budget, nb)).indices
    fetched[first] = True
    rounds = 0
    while True:
        rounds += 1
        blocks = fetched.nonzero().squeeze(1).to(keys.device)  # ascending: ties keep index order
        idx = (blocks[:, None] * s + torch.arange(s, device=keys.device)).reshape(-1)
        idx = idx[idx < m]
        sub = keys.index_select(1, idx).to(q.device)
        local = score_topk(q, sub, top_k, backend=backend)
        idx = idx.to(q.device)
        hits = torch.where(local >= 0, idx[local.clamp(min=0)], local)
        if not refine or bool(fetched.all()):
            break
        # the k-th hit's score per row and head; -inf where fewer than top_k keys were fetched
        h = sub.shape[2]
        g = hq // h
        last = local[..., -1]
        head = torch.arange(hq, device=q.device) // g
        k_last = sub[torch.arange(b, device=q.device)[:, None, None], last.clamp(min=0), head[None, None, :]]
        kth = (q.float() * k_last.float()).sum(-1)
        kth = torch.where(last >= 0, kth, torch.full_like(kth, float("-inf")))
        open_ = (ub + margin >= kth[..., None]) & ~fetched
        more = open_.any(dim=(0, 1, 2))
        if not bool(more.any()):
            break
        fetched |= more
    return CandidateResult(hits=hits, fetched=int(fetched.sum()), rounds=rounds)
