"""Sparse-scope attention: flash attention over ``[sink | selected | local]`` read from the store.

The scope is never gathered: each scope position reads its store row by index and its key is
rotated on the fly at the position (kernels/README.md). One program owns ``BM`` rows ``r = t * G +
g`` of one (sequence, KV head). A decode step splits the scope over programs and merges the partial
outputs by their log-sum-exp: in a merge kernel, or in the last program to finish (``fuse_merge``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from reattention_kernels.dispatch import interpreting
from reattention_kernels.triton_ops.arrivals import arrival_counts, last_arrival
from reattention_kernels.triton_ops.rope import cached_rope_table, rotated_queries
from reattention_kernels.triton_ops.rows import group_rows

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 128
# Most rows per (sequence, KV head) that the last program merges alone (``fuse_merge``): a decode
# step's GQA group; a split prefill chunk's hundreds of rows keep the merge kernel.
_FUSED_MERGE_MAX_ROWS = 16


@triton.jit
def _scope_tile(
    q1, q2, k_base, v_base, sel_idx, cos_t, sin_t, p0, p_hi, b_qpos, b_m, b_l, b_acc, sink_len, b_ns, local_start,
    stride_ss, stride_kt, stride_vt, scale_log2,
    D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Scope positions ``[p0, p0 + BN)``: one online-softmax step; ``MASK=False`` when every row sees them all."""
    HALF: tl.constexpr = D // 2
    dtype = q1.dtype
    o_h = tl.arange(0, HALF)
    o_d = tl.arange(0, D)
    o_p = p0 + tl.arange(0, BN)
    m_p = o_p < p_hi
    m_sel = (o_p >= sink_len) & (o_p < sink_len + b_ns) & m_p
    b_sel = tl.load(sel_idx + (o_p - sink_len).to(tl.int64) * stride_ss, mask=m_sel, other=0)
    # [BN] store row of each scope position
    o_tok = tl.where(
        o_p < sink_len, o_p.to(tl.int64), tl.where(m_sel, b_sel.to(tl.int64), (local_start + o_p - sink_len - b_ns))
    ).to(tl.int64)
    p_k = k_base + o_tok[:, None] * stride_kt + o_h[None, :]
    o_tk = o_p.to(tl.int64)[:, None] * HALF + o_h[None, :]
    p_v = v_base + o_tok[:, None] * stride_vt + o_d[None, :]
    if MASK:
        b_k1 = tl.load(p_k, mask=m_p[:, None], other=0.0)
        b_k2 = tl.load(p_k + HALF, mask=m_p[:, None], other=0.0)
        b_ck = tl.load(cos_t + o_tk, mask=m_p[:, None], other=0.0)
        b_sk = tl.load(sin_t + o_tk, mask=m_p[:, None], other=0.0)
    else:  # unpredicated loads: every position of the tile is in the scope
        b_k1 = tl.load(p_k)
        b_k2 = tl.load(p_k + HALF)
        b_ck = tl.load(cos_t + o_tk)
        b_sk = tl.load(sin_t + o_tk)
    # [BN, HALF] rotated in the input dtype, rounded after each product as transformers' apply_rotary_pos_emb
    # is (and as the reference is); fp32 math would cost four conversions per element
    b_k1r = b_k1 * b_ck - b_k2 * b_sk
    b_k2r = b_k2 * b_ck + b_k1 * b_sk
    if IEEE:
        b_s = tl.dot(q1, tl.trans(b_k1r), input_precision="ieee")
        b_s = tl.dot(q2, tl.trans(b_k2r), b_s, input_precision="ieee")
    else:
        b_s = tl.dot(q1, tl.trans(b_k1r))
        b_s = tl.dot(q2, tl.trans(b_k2r), b_s)
    # [BM, BN] raw scores; the softmax scale (in log2 units) is applied inside exp2's argument
    if MASK:
        b_s = tl.where(m_p[None, :] & (o_p[None, :] <= b_qpos[:, None]), b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
        b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # a row that has seen no key yet
        b_v = tl.load(p_v, mask=m_p[:, None], other=0.0)
    else:
        b_mn = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
        b_ms = b_mn
        b_v = tl.load(p_v)
    b_p = tl.exp2(b_s * scale_log2 - b_ms[:, None])
    b_alpha = tl.exp2(b_m - b_ms)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if IEEE:
        b_acc = tl.dot(b_p.to(dtype), b_v, b_acc * b_alpha[:, None], input_precision="ieee")
    else:
        b_acc = tl.dot(b_p.to(dtype), b_v, b_acc * b_alpha[:, None])
    return b_mn, b_l, b_acc


@triton.jit
def _merge_row(ws_o, ws_lse, o, lse, i_b, i_h, i_bh, i_r, stride_ob, stride_ot, stride_oh, TQ, R, NSPLIT,
               H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
               RETURN_LSE: tl.constexpr):  # fmt: skip
    """Row ``i_r`` of (sequence ``i_b``, KV head ``i_h``): its ``NSPLIT`` partial outputs ``ws_o`` and
    log2-domain log-sum-exps ``ws_lse`` merged by their weights into ``o`` (and ``lse``, natural log)."""
    o_s = tl.arange(0, BS)
    m_s = o_s < NSPLIT
    o_d = tl.arange(0, D)
    o_w = (i_bh * R + i_r).to(tl.int64) * NSPLIT + o_s
    # [BS]; .cg: in a launch's last program, the other programs' partials are in the L2, not this SM's L1
    b_lse = tl.load(ws_lse + o_w, mask=m_s, other=float("-inf"), cache_modifier=".cg")
    b_mx = tl.max(b_lse, 0)
    b_w = tl.exp2(b_lse - b_mx)
    b_sw = tl.sum(b_w, 0)
    # [BS, D]
    b_o = tl.load(ws_o + o_w[:, None] * D + o_d[None, :], mask=m_s[:, None], other=0.0, cache_modifier=".cg")
    b_o = tl.sum(b_o * (b_w / b_sw)[:, None], 0)
    i_t = tl.cast(i_r // G, tl.int64)  # a cast, not .to(): the interpreter's loop counters are Python ints
    i_hq = i_h * G + i_r % G
    tl.store(o + i_b * stride_ob + i_t * stride_ot + i_hq * stride_oh + o_d, b_o.to(o.dtype.element_ty))
    if RETURN_LSE:
        tl.store(lse + (i_b * TQ + i_t) * (H * G) + i_hq, (b_mx + tl.log2(b_sw)) * 0.6931471805599453)


@triton.jit(do_not_specialize=["TQ", "T", "sink_len", "local_start", "R", "NSPLIT", "pos_per_split"])
def scope_attention_fwd_kernel(
    q,
    k,
    v,
    sel_idx,
    n_sel,
    cos_t,
    sin_t,
    o,
    lse,
    ws_o,
    ws_lse,
    shift,
    counts,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_sb,
    stride_ss,
    stride_ob,
    stride_ot,
    stride_oh,
    TQ,
    T,
    sink_len,
    local_start,
    R,
    NSPLIT,
    pos_per_split,
    scale_log2,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    IEEE: tl.constexpr,
    SHIFT: tl.constexpr,
    MERGE: tl.constexpr = False,
    BS: tl.constexpr = 1,
):
    """One ``[BM]``-row block of one (sequence, KV head) over one split of the scope: its output, or
    with ``SPLIT`` its partial output and log-sum-exp into ``ws_o``/``ws_lse``; with ``MERGE`` too,
    the group's last program to finish (``counts [B * H]``, `arrivals.last_arrival`) merges them."""
    HALF: tl.constexpr = D // 2
    i_m, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)

    b_ns = tl.load(n_sel + i_b).to(tl.int32)
    L = sink_len + b_ns + T - local_start
    if SHIFT:  # the store grew since the launch was recorded: the local window moved, the scope did not
        local_start = local_start + tl.load(shift).to(tl.int32)
    o_r, m_r, o_t, o_hq = group_rows(i_m, i_h, R, BM, G)
    o_d = tl.arange(0, D)
    # [BM] position of each query row; padding rows sit past the scope and see all of it
    b_qpos = L - TQ + o_t

    p_q = q + i_b * stride_qb + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh
    b_q1r, b_q2r = rotated_queries(p_q, b_qpos, m_r, cos_t, sin_t, HALF)

    t_hi = tl.minimum((i_m * BM + BM - 1) // G, TQ - 1)
    p_lo = i_s * pos_per_split
    p_hi = tl.minimum(tl.minimum(p_lo + pos_per_split, L), L - TQ + t_hi + 1)
    # Tiles wholly before the program's first query position are seen in full by all its rows: they
    # run without masks or predicated loads
    p_free = L - TQ + (i_m * BM) // G + 1
    p_free = p_lo + tl.maximum(tl.minimum(p_free, p_hi) - p_lo, 0) // BN * BN
    k_base = k + i_b * stride_kb + i_h * stride_kh
    v_base = v + i_b * stride_vb + i_h * stride_vh
    s_base = sel_idx + i_b * stride_sb

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for p0 in range(p_lo, p_free, BN):
        b_m, b_l, b_acc = _scope_tile(
            b_q1r, b_q2r, k_base, v_base, s_base, cos_t, sin_t, p0, p_hi, b_qpos, b_m, b_l, b_acc, sink_len, b_ns,
            local_start, stride_ss, stride_kt, stride_vt, scale_log2, D, BN, False, IEEE,
        )  # fmt: skip
    for p0 in range(p_free, p_hi, BN):
        b_m, b_l, b_acc = _scope_tile(
            b_q1r, b_q2r, k_base, v_base, s_base, cos_t, sin_t, p0, p_hi, b_qpos, b_m, b_l, b_acc, sink_len, b_ns,
            local_start, stride_ss, stride_kt, stride_vt, scale_log2, D, BN, True, IEEE,
        )  # fmt: skip

    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    # log2-domain log-sum-exp; -inf for rows that saw no key of this split
    b_lse2 = b_m + tl.log2(tl.where(b_l == 0.0, 1.0, b_l))
    if SPLIT:
        o_w = (i_bh * R + o_r).to(tl.int64) * NSPLIT + i_s
        tl.store(ws_lse + o_w, b_lse2, mask=m_r)
        tl.store(ws_o + o_w[:, None] * D + o_d[None, :], b_o, mask=m_r[:, None])
        if MERGE:  # noqa: SIM102  (nested: without MERGE, ``counts`` is no count tensor and is never touched)
            if last_arrival(counts, i_bh, tl.num_programs(0) * tl.num_programs(1)):
                for i_r in range(R):
                    _merge_row(ws_o, ws_lse, o, lse, i_b, i_h, i_bh, i_r, stride_ob, stride_ot, stride_oh, TQ, R,
                               NSPLIT, H, G, D, BS, RETURN_LSE)  # fmt: skip
    else:
        p_o = o + i_b * stride_ob + o_t[:, None] * stride_ot + o_hq[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])
        if RETURN_LSE:
            p_lse = lse + (i_b * TQ + o_t) * (H * G) + o_hq
            tl.store(p_lse, b_lse2 * 0.6931471805599453, mask=m_r)


@triton.jit(do_not_specialize=["TQ", "R", "NSPLIT"])
def scope_attention_fwd_kernel_merge(
    ws_o,
    ws_lse,
    o,
    lse,
    stride_ob,
    stride_ot,
    stride_oh,
    TQ,
    R,
    NSPLIT,
    H: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    _merge_row(ws_o, ws_lse, o, lse, i_b, i_h, i_bh, i_r, stride_ob, stride_ot, stride_oh, TQ, R, NSPLIT, H, G, D, BS,
               RETURN_LSE)  # fmt: skip


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _large_smem(index: int) -> bool:
    """Whether a program may use ~200 KB of shared memory (compute capability 9.0 offers 227 KB, 8.0 163 KB)."""
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin >= 200 * 1024


def _config(rows: int, dtype: torch.dtype, d: int, device: torch.device | None = None) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages): rows of the GQA group per program, scope keys per tile."""
    if interpreting():
        return 16, 16, 4, 1
    if (
        d == 128  # head dim 256 would need 256 KB of stages
        and rows >= 128
        and dtype != torch.float32
        and device is not None
        and device.type == "cuda"
        and _large_smem(device.index if device.index is not None else torch.cuda.current_device())
    ):
        # each key tile is rotated once for 128 rows instead of 64 (needs ~200 KB of shared memory)
        return 128, 128, 8, 3
    bm = min(128 if d <= 64 else 64, max(16, triton.next_power_of_2(rows)))
    if dtype == torch.float32:
        return min(bm, 64), 32, 4, 2
    if bm <= 16:
        return bm, 128, 4, 2
    return bm, 64, (8 if bm >= 128 else 4), 2


def scope_attention_fwd(
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
    length: int | None = None,
    shift: torch.Tensor | None = None,
    fuse_merge: bool = False,
    splits: int | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`scope_attention_triton` with optional forced scope splits and (BM, BN, num_warps, num_stages)."""
    b, tq, hq, d = q.shape
    h = k.shape[2]
    t = k.shape[1] if length is None else length
    if not 0 <= t <= k.shape[1]:
        raise ValueError(f"length {t} is outside the {k.shape[1]} stored tokens given")
    if t - local_start < tq:
        raise ValueError(f"local window [{local_start}, {t}) is shorter than the {tq} queries")
    if hq % h != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if d < 32 or d & (d - 1) or inv_freq.numel() != d // 2:
        raise ValueError(f"head dim must be a power of two >= 32 with D/2 inverse frequencies, got {d}")
    g = hq // h
    dev = q.device
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    o = torch.empty((b, tq, hq, d), dtype=q.dtype, device=dev)
    lse = torch.empty((b, tq, hq), dtype=torch.float32, device=dev) if return_lse else None
    if b == 0 or tq == 0:
        return o, lse
    ns = sel_idx.shape[1] if sel_idx.dim() == 2 else 0
    if ns == 0:
        sel_idx = torch.zeros((b, 1), dtype=torch.int64, device=dev)
    n_sel = n_sel.to(device=dev)
    if n_sel.dtype not in (torch.int32, torch.int64):
        n_sel = n_sel.to(torch.int64)
    l_max = sink_len + ns + t - local_start
    cos_t, sin_t = cached_rope_table(inv_freq, l_max, attention_scaling, q.dtype, dev)

    rows = tq * g
    bm, bn, warps, stages = config or _config(rows, q.dtype, d, dev)
    n_m = triton.cdiv(rows, bm)
    base = b * h * n_m
    if splits is None:
        if interpreting() or dev.type != "cuda":
            splits = triton.cdiv(4, base)
        else:
            sms = _num_sms(torch.cuda.current_device() if dev.index is None else dev.index)
            # programs for half the SMs or more run unsplit: a split and its merge cost more than the
            # idle SMs give
            splits = 1 if 2 * base >= sms else triton.cdiv(2 * sms, base)
    splits = max(1, min(splits, _MAX_SPLITS, triton.cdiv(l_max, bn)))
    pos_per_split = triton.cdiv(triton.cdiv(l_max, splits), bn) * bn
    splits = triton.cdiv(l_max, pos_per_split)
    ieee = q.dtype == torch.float32
    lse_arg = lse if lse is not None else o
    shift_arg = n_sel if shift is None else shift
    common = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sel_idx.stride(0), sel_idx.stride(1),
        o.stride(0), o.stride(1), o.stride(2), tq, t, sink_len, local_start, rows,
    )  # fmt: skip
    scale_log2 = float(scale) * _LOG2E
    if splits == 1:
        scope_attention_fwd_kernel[(n_m, 1, b * h)](
            q, k, v, sel_idx, n_sel, cos_t, sin_t, o, lse_arg, o, o, shift_arg, o, *common, 1, pos_per_split,
            scale_log2, H=h, G=g, D=d, BM=bm, BN=bn, SPLIT=False, RETURN_LSE=return_lse, IEEE=ieee,
            SHIFT=shift is not None, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return o, lse
    ws_o = torch.empty((b * h, rows, splits, d), dtype=torch.float32, device=dev)
    ws_lse = torch.empty((b * h, rows, splits), dtype=torch.float32, device=dev)
    bs = triton.next_power_of_2(splits)
    counts = arrival_counts(dev, b * h) if fuse_merge and rows <= _FUSED_MERGE_MAX_ROWS else None
    # BS only where the kernel reads it (with MERGE): each value of a constexpr is a variant to compile
    scope_attention_fwd_kernel[(n_m, splits, b * h)](
        q, k, v, sel_idx, n_sel, cos_t, sin_t, o, lse_arg, ws_o, ws_lse, shift_arg, o if counts is None else counts,
        *common, splits, pos_per_split, scale_log2, H=h, G=g, D=d, BM=bm, BN=bn, SPLIT=True, RETURN_LSE=return_lse,
        IEEE=ieee, SHIFT=shift is not None, MERGE=counts is not None, BS=1 if counts is None else bs,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if counts is None:
        scope_attention_fwd_kernel_merge[(rows, b * h)](
            ws_o, ws_lse, o, lse_arg, o.stride(0), o.stride(1), o.stride(2), tq, rows, splits,
            H=h, G=g, D=d, BS=bs, RETURN_LSE=return_lse, num_warps=4,
        )  # fmt: skip
    return o, lse


def scope_attention_triton(
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
    length: int | None = None,
    shift: torch.Tensor | None = None,
    fuse_merge: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of pre-RoPE queries over their scope ``[sink | selected | local]``, fused.

    Args:
        q (torch.Tensor): pre-RoPE queries of shape ``[B, TQ, HQ, D]``, the last ``TQ`` stored tokens.
        k (torch.Tensor): pre-RoPE key store of shape ``[B, T, H, D]`` (contiguous last dim).
        v (torch.Tensor): value store of shape ``[B, T, H, D]``.
        sel_idx (torch.Tensor): int ``[B, NS]`` absolute indices of selected middle tokens,
            ascending; only the first ``n_sel[b]`` entries of row ``b`` are read.
        n_sel (torch.Tensor): int ``[B]`` valid entries per row of ``sel_idx``, on the device
            (read by the kernel: no host synchronisation).
        sink_len (int): sink tokens ``[0, sink_len)``.
        local_start (int): local window ``[local_start, T)``, at least ``TQ`` long.
        inv_freq (torch.Tensor): RoPE inverse frequencies ``[D // 2]``.
        attention_scaling (float): RoPE cos/sin multiplier.
        scale (float): softmax scale, usually ``D ** -0.5``.
        return_lse (bool): also return the natural log-sum-exp of the scaled scores.
            Default: ``False``.
        length (int | None): stored tokens ``T`` (default ``k.shape[1]``; ``k`` and ``v`` may be
            longer buffers).
        shift (torch.Tensor | None): int64 ``[1]`` on the device, added there to ``length`` and
            ``local_start`` (see `reattention_kernels.scope_attention`).
        fuse_merge (bool): a split launch of few rows per KV head (a decode step) merges its partial
            outputs in its last program instead of a merge kernel. Default: ``False``.

    Returns:
        ``(o, lse)``: ``o [B, TQ, HQ, D]`` in ``q.dtype``; ``lse [B, TQ, HQ]`` fp32 or ``None``.
    """
    return scope_attention_fwd(
        q, k, v, sel_idx, n_sel, sink_len=sink_len, local_start=local_start, inv_freq=inv_freq,
        attention_scaling=attention_scaling, scale=scale, return_lse=return_lse, length=length, shift=shift,
        fuse_merge=fuse_merge,
    )  # fmt: skip


__all__ = ["scope_attention_fwd", "scope_attention_triton"]
