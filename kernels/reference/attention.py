"""Reference sparse-scope attention: gather ``[sink | selected | local]``, apply RoPE at the scope
positions ``0 .. L-1`` (Hugging Face's ``rotate_half`` convention, fp32 cos/sin), attend with
bottom-right causality. The specification of `triton_ops.attention` (kernels/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[P, D]`` for integer ``positions [P]`` (fp32 math, cast to ``dtype``)."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :].to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [P, heads, D]`` by per-row ``cos, sin [P, D]`` (rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def scope_indices(sink_len: int, sel: torch.Tensor, local_start: int, total: int) -> torch.Tensor:
    """Absolute token indices of one sequence's scope: ``[sink | sel | local]``."""
    dev = sel.device
    return torch.cat(
        [
            torch.arange(sink_len, device=dev),
            sel.to(torch.int64),
            torch.arange(local_start, total, device=dev),
        ]
    )


def scope_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel_idx: torch.Tensor,
    n_sel: torch.Tensor,
    *,
    sink_len: int,
    local_start: int,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    scale: float,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of pre-RoPE queries over their scope, RoPE applied at scope positions.

    Args:
        q (torch.Tensor): pre-RoPE queries ``[B, TQ, HQ, D]``, the last ``TQ`` stored tokens.
        k (torch.Tensor): pre-RoPE key store ``[B, T, H, D]`` (``HQ % H == 0``).
        v (torch.Tensor): value store ``[B, T, H, D]``.
        sel_idx (torch.Tensor): int64 ``[B, NS]`` absolute indices of selected middle tokens,
            ascending; only the first ``n_sel[b]`` entries of row ``b`` are used.
        n_sel (torch.Tensor): int ``[B]`` number of valid entries per row of ``sel_idx``.
        sink_len (int): sink tokens ``[0, sink_len)`` in the scope.
        local_start (int): local window ``[local_start, T)``; must satisfy ``T - local_start >= TQ``.
        inv_freq (torch.Tensor): RoPE inverse frequencies ``[D // 2]``.
        attention_scaling (float): RoPE cos/sin multiplier (YaRN-style; 1.0 for plain RoPE).
        scale (float): softmax scale, usually ``D ** -0.5``.
        return_lse (bool): also return the log-sum-exp of the scaled scores.

    Returns:
        ``(o, lse)``: ``o [B, TQ, HQ, D]`` in ``q.dtype``; ``lse [B, TQ, HQ]`` fp32 or ``None``.
    """
    b, tq, hq, d = q.shape
    t, h = k.shape[1], k.shape[2]
    if t - local_start < tq:
        raise ValueError(f"local window [{local_start}, {t}) is shorter than the {tq} queries")
    g = hq // h
    outs, lses = [], []
    for bi in range(b):
        idx = scope_indices(sink_len, sel_idx[bi, : int(n_sel[bi])], local_start, t)
        length = idx.numel()
        pos = torch.arange(length, device=q.device)
        cos, sin = rope_cos_sin(pos, inv_freq, attention_scaling, q.dtype)
        k_rot = apply_rope_ref(k[bi, idx], cos, sin)  # [L, H, D]
        q_rot = apply_rope_ref(q[bi], cos[length - tq :], sin[length - tq :])  # [TQ, HQ, D]
        vv = v[bi, idx]
        # [HQ, TQ, D] x [HQ, L, D]; query head hq reads KV head hq // G
        qh = q_rot.transpose(0, 1)
        kh, vh = k_rot.transpose(0, 1), vv.transpose(0, 1)
        mask = None
        if tq > 1:
            qpos = torch.arange(length - tq, length, device=q.device)
            mask = pos[None, :] <= qpos[:, None]  # [TQ, L], bottom-right causal
        if return_lse:
            kh, vh = kh.repeat_interleave(g, dim=0), vh.repeat_interleave(g, dim=0)
            s = (qh.float() @ kh.float().transpose(1, 2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            lse = torch.logsumexp(s, dim=-1)  # [HQ, TQ]
            o = (torch.softmax(s, dim=-1) @ vh.float()).to(q.dtype)
            lses.append(lse.transpose(0, 1))
        else:
            o = F.scaled_dot_product_attention(
                qh[None], kh[None], vh[None], attn_mask=mask, scale=scale, enable_gqa=g > 1
            )[0]
        outs.append(o.transpose(0, 1))
    out = torch.stack(outs)
    return out, (torch.stack(lses) if return_lse else None)
