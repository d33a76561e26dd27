"""Reference position-agnostic top-k scoring: raw ``q . k`` per (row, query head) over the middle,
accumulated in fp32, best ``top_k`` by (score descending, index ascending), ``-1`` where the middle
is shorter. The specification of `triton_ops.topk`, which must agree exactly (kernels/README.md).
"""

from __future__ import annotations

import torch

# Keys are scored in slices of this many tokens (`key_slice`) so the [rows, keys] score tile stays bounded.
_KEY_SLICE = 16384
_IDX_BITS = 32
# CPU GEMMs round the last, partial column tile differently from full tiles (a different
# micro-kernel), so two bitwise-identical keys could score 1 ulp apart and break the
# index-ascending tie rule. Padding the key count to a multiple of this keeps every real column
# in full tiles (a multiple of every tile width we know of; tests/kernels/test_topk.py checks it).
_COLUMN_PAD = 64


def _scores(qg: torch.Tensor, kh: torch.Tensor) -> torch.Tensor:
    """fp32 ``qg [R, D] @ kh [C, D]^T`` -> ``[R, C]``, identical for identical keys wherever they sit."""
    c = kh.shape[0]
    pad = (-c) % _COLUMN_PAD
    if pad:
        kh = torch.cat([kh, kh.new_zeros(pad, kh.shape[1])])
    return (qg @ kh.T)[:, :c]


def _ordered_topk(scores: torch.Tensor, base: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``scores [R, C]`` under (score desc, index asc); returns (values, global idx)."""
    c = scores.shape[-1]
    if c <= k:
        idx = torch.arange(c, device=scores.device).expand_as(scores)
        return scores, idx + base
    vals, idx = scores.topk(k + 1, dim=-1)
    tie = vals[:, k - 1] == vals[:, k]
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(tie.any()):
        # torch.topk breaks ties arbitrarily; re-rank the tied rows with unique integer keys.
        rows = tie.nonzero().squeeze(1)
        sub = scores[rows]
        bits = sub.contiguous().view(torch.int32)
        ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
        pos = torch.arange(c, device=scores.device, dtype=torch.int64)
        keys = (ordered << _IDX_BITS) + ((1 << _IDX_BITS) - 1 - pos)
        kidx = keys.topk(k, dim=-1).indices
        vals[rows] = sub.gather(1, kidx)
        idx[rows] = kidx
    return vals, idx + base


def _rank(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort candidates ``[R, N]`` by (value desc, index asc) and keep the first ``k``."""
    order = idx.argsort(dim=-1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = vals.argsort(dim=-1, descending=True, stable=True)[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def score_topk_ref(q: torch.Tensor, k: torch.Tensor, top_k: int, *, key_slice: int = _KEY_SLICE) -> torch.Tensor:
    """Exact per-row, per-head top-k of raw ``q . k`` over all keys.

    Args:
        q (torch.Tensor): pre-RoPE queries ``[B, TQ, HQ, D]``.
        k (torch.Tensor): pre-RoPE keys ``[B, TK, H, D]`` (any strides), ``HQ % H == 0``.
        top_k (int): keys kept per (row, query head).
        key_slice (int): keys scored at a time, which bounds the ``[rows, keys]`` score tile.

    Returns:
        torch.Tensor: int64 ``[B, TQ, HQ, top_k]`` indices into ``TK``, best first (score
        descending, index ascending on ties), ``-1`` in slots beyond ``TK``.
    """
    b, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    if hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    g = hq // h
    out = torch.full((b, tq, hq, top_k), -1, dtype=torch.int64, device=q.device)
    if tk == 0:
        return out
    kk = min(top_k, tk)
    for bi in range(b):
        for hi in range(h):
            # rows of the GQA group: [G * TQ, D], head-major so row r = (group member, token)
            qg = q[bi, :, hi * g : (hi + 1) * g, :].permute(1, 0, 2).reshape(g * tq, d).float()
            best_v = best_i = None
            for start in range(0, tk, key_slice):
                kh = k[bi, start : start + key_slice, hi, :].float()
                vals, idx = _ordered_topk(_scores(qg, kh), start, kk)
                if best_v is None:
                    best_v, best_i = vals, idx
                else:
                    best_v, best_i = _rank(torch.cat([best_v, vals], 1), torch.cat([best_i, idx], 1), kk)
            assert best_v is not None and best_i is not None
            best_v, best_i = _rank(best_v, best_i, kk)
            out[bi, :, hi * g : (hi + 1) * g, :kk] = best_i.reshape(g, tq, kk).permute(1, 0, 2)
    return out
