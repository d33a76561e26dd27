"""Exact top-k over an offloaded middle: per-block key bounds on the device, keys fetched on demand.

`KeyBounds` keeps per-block key minima and maxima on the device; `candidate_topk` scores only the blocks
whose bound can reach the top-k, and with ``refine`` returns exactly the top-k over the whole middle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reattention_core.store.segments import TokenSegments
from reattention_kernels import KernelOptions, score_topk

# fp32 rounding of a D-term dot product is far below this share of sum_d |q_d| * max|k_d|.
_MARGIN = 1e-4


class KeyBounds:
    """Elementwise min/max of the keys of each block of ``block`` tokens, per batch row and KV head.

    Bounds are ``[B, NB, H, D]`` with ``NB = ceil(M / block)``. For a query ``q``,
    ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` bounds every key score of the block from above (Quest's
    bound, Tang et al. 2024).

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
            assert self.kmax is not None  # set with kmin
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

    def truncate(self, tokens: int, keys: torch.Tensor | TokenSegments) -> None:
        """Forget tokens from ``tokens`` on; ``keys`` ``[B, >= tokens, H, D]`` rebuild the last partial block."""
        if tokens >= self.tokens:
            return
        whole = tokens // self.block
        if self.kmin is not None and self.kmax is not None:
            self.kmin, self.kmax = self.kmin[:, :whole].clone(), self.kmax[:, :whole].clone()
        self.tokens = whole * self.block
        self.append(keys[:, self.tokens : tokens])

    @property
    def num_blocks(self) -> int:
        return 0 if self.kmin is None else self.kmin.shape[1]

    def _grouped(self, q: torch.Tensor) -> torch.Tensor:
        """fp32 queries ``[B, TQ, H, G, D]`` on the bounds' device (query heads grouped by KV head)."""
        if self.kmin is None or self.kmax is None:
            raise ValueError("no keys yet")
        b, tq, hq, d = q.shape
        h = self.kmin.shape[2]
        return q.to(self.device, torch.float32).view(b, tq, h, hq // h, d)

    def upper_bounds(self, q: torch.Tensor) -> torch.Tensor:
        """Per-block score bounds for queries ``[B, TQ, HQ, D]``: ``[B, TQ, HQ, NB]``."""
        qf = self._grouped(q)
        # [B, TQ, H, G, NB]: sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin
        ub = torch.einsum("bthgd,bnhd->bthgn", qf.clamp(min=0), self.kmax) + torch.einsum(
            "bthgd,bnhd->bthgn", qf.clamp(max=0), self.kmin
        )
        return ub.flatten(2, 3)

    def rounding_margins(self, q: torch.Tensor) -> torch.Tensor:
        """How far fp32 rounding may move a block's scores past `upper_bounds`: ``[B, TQ, HQ, NB]``."""
        qf = self._grouped(q)
        assert self.kmax is not None and self.kmin is not None  # as in `upper_bounds`
        mag = torch.maximum(self.kmax.abs(), self.kmin.abs())
        return (_MARGIN * torch.einsum("bthgd,bnhd->bthgn", qf.abs(), mag) + 1e-30).flatten(2, 3)


@dataclass(frozen=True)
class CandidateResult:
    """``hits``: int64 ``[B, TQ, HQ, top_k]`` as `score_topk` returns them; ``fetched``: blocks read."""

    hits: torch.Tensor
    fetched: int
    rounds: int


def candidate_topk(
    q: torch.Tensor,
    keys: torch.Tensor | TokenSegments,
    bounds: KeyBounds,
    top_k: int,
    *,
    budget: int,
    refine: bool = True,
    lo: int = 0,
    hi: int | None = None,
    kernel_options: KernelOptions | None = None,
) -> CandidateResult:
    """Top-k keys of ``q`` over ``keys[:, lo:hi]`` (host or device) reading only candidate blocks.

    Args:
        q: pre-RoPE queries ``[B, TQ, HQ, D]`` on the compute device.
        keys: pre-RoPE keys ``[B, T, H, D]`` (e.g. pinned host memory), of which ``bounds``
            covers at least the first ``hi``; the blocks are those of ``bounds`` (from token 0),
            so the range's first and last blocks may reach outside it (their bounds still hold).
        budget: blocks fetched first (the highest bounds over all rows and heads).
        refine: fetch every further block that could still hold a key at or above a row's k-th hit,
            until no row can change: the result then equals the full top-k, ties included.
        lo, hi: the token range scored (the middle of the store); ``hi`` defaults to ``T``.

    Returns:
        `CandidateResult` whose ``hits`` (relative to ``lo``) equal
        ``score_topk(q, keys[:, lo:hi], top_k)`` when ``refine``.
    """
    hi = keys.shape[1] if hi is None else hi
    if bounds.tokens < hi:
        raise ValueError(f"the bounds cover {bounds.tokens} tokens, the range ends at {hi}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not 0 <= lo < hi:
        raise ValueError(f"empty or negative token range [{lo}, {hi})")
    b, _, hq, _ = q.shape
    s = bounds.block
    first_block, last_block = lo // s, (hi - 1) // s
    span = slice(first_block, last_block + 1)
    ub = bounds.upper_bounds(q)[..., span]
    # what a block may score at most, rounding included (only refinement needs it)
    reach = ub + bounds.rounding_margins(q)[..., span] if refine else None
    nb = last_block - first_block + 1
    fetched = torch.zeros(nb, dtype=torch.bool, device=ub.device)
    fetched[ub.amax(dim=(0, 1, 2)).topk(min(budget, nb)).indices] = True
    rounds = 0
    while True:
        rounds += 1
        blocks = fetched.nonzero().squeeze(1).to(keys.device) + first_block  # ascending: ties keep index order
        idx = (blocks[:, None] * s + torch.arange(s, device=keys.device)).reshape(-1)
        idx = idx[(idx >= lo) & (idx < hi)]
        sub = _gather_to(keys, idx, q.device)
        local = score_topk(q, sub, top_k, kernel_options=kernel_options)
        idx = idx.to(q.device) - lo
        hits = torch.where(local >= 0, idx[local.clamp(min=0)], local)
        if reach is None or bool(fetched.all()):
            break
        # the k-th hit's score per row and head; -inf where fewer than top_k keys were fetched
        g = hq // sub.shape[2]
        last = local[..., -1]
        head = torch.arange(hq, device=q.device) // g
        k_last = sub[torch.arange(b, device=q.device)[:, None, None], last.clamp(min=0), head[None, None, :]]
        kth = (q.float() * k_last.float()).sum(-1)
        kth = torch.where(last >= 0, kth, torch.full_like(kth, float("-inf")))
        more = ((reach >= kth[..., None]) & ~fetched).any(dim=(0, 1, 2))
        if not bool(more.any()):
            break
        fetched |= more
    return CandidateResult(hits=hits, fetched=int(fetched.sum()), rounds=rounds)


def _gather_to(keys: torch.Tensor | TokenSegments, idx: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``keys[:, idx]`` on ``dev``; from host memory to a GPU through pinned staging (an async copy)."""
    if dev.type != "cuda" or keys.is_cuda:
        return keys.index_select(1, idx).to(dev)
    staging = torch.empty((keys.shape[0], idx.numel(), *keys.shape[2:]), dtype=keys.dtype, pin_memory=True)
    if isinstance(keys, TokenSegments):
        keys.index_select(1, idx, out=staging)
    else:
        torch.index_select(keys, 1, idx, out=staging)
    # the caching host allocator keeps ``staging`` until the copy is done, so it may be freed at once
    return staging.to(dev, non_blocking=True)
