"""Where the prefill scope attention's time goes: ablations of its kernel at one shape (a design aid).

    python benchmarks/probe_scope_attention.py [--model llama8b|smollm2] [--out FILE.jsonl] [--check]

The package's kernel (`reattention_kernels.triton_ops.attention`) is timed beside a copy of its
inner loop with switches, on the same inputs, as CUDA-graph replays with the L2 flushed:

* ``rope``: how each key tile is rotated. ``half`` (the package: two half-rows in fp32, two
  ``D/2`` dots), ``full`` (whole rows, the rotated half loaded a second time, one ``D`` dot),
  ``full16`` (the same in the input dtype, as transformers rounds), ``none`` (no rotation: the cost
  of RoPE on the fly), ``pre`` (keys rotated beforehand into a scope-ordered workspace by a second
  kernel, whose time is included: the design the issue rules out, as a bound);
* ``gather``: scope rows read through the index (the package) or, as a bound, a contiguous range;
* block shape ``(BM, BN, warps, stages)``;
* ``--two-loops``: only the package and `_two_loops`, the package's loop with the key tiles every row
  sees run unmasked apart from the causal rest (the design adopted at 5164439), keys rotated in fp32,
  in the input dtype or (a bound) not at all, and the unmasked loop warp-specialized or not.

``torch.nn.functional.scaled_dot_product_attention`` on an already-gathered, already-rotated scope
(query heads expanded, no mask: the last ``TQ`` causal pairs are a few percent of the work) is the
flash-attention reference. TFLOP/s counts the visible (query, key) pairs, as bench_kernels does.
``--check`` compares the output of the package kernel at every block shape, and of every variant that
computes the same function (keys rotated, rows gathered), with the package kernel's default (any device;
under ``TRITON_INTERPRET=1`` on a CPU with tiny shapes); a shape that does not fit the device is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import Timer, ensure_importable, gather_rotate, git_rev

ensure_importable()
from reattention_kernels.reference.attention import apply_rope_ref
from reattention_kernels.triton_ops.attention import cached_rope_table, rotated_queries, scope_attention_fwd
from reattention_kernels.triton_ops.rows import group_rows

SHAPES = {  # (HQ, H, D, TQ, scope, store)
    "llama8b": (32, 8, 128, 512, 16416, 131072),
    "smollm2": (9, 3, 64, 256, 1312, 131072),
    "tiny": (4, 2, 64, 16, 80, 256),
}


@triton.jit
def _prerotate(k, sel_idx, cos_t, sin_t, ws, L, sink_len, n_sel, local_start, stride_kt, stride_kh,
               H: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, V=None, VW=None, COPY_V: tl.constexpr = False):  # fmt: skip
    """Rotated keys of scope positions ``[i*BP, i*BP+BP)`` of one head into ``ws [H, L, D]`` (and values into ``VW``)."""
    HALF: tl.constexpr = D // 2
    i_p, i_h = tl.program_id(0), tl.program_id(1)
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < L
    o_h = tl.arange(0, HALF)
    m_sel = (o_p >= sink_len) & (o_p < sink_len + n_sel) & m_p
    b_sel = tl.load(sel_idx + (o_p - sink_len), mask=m_sel, other=0).to(tl.int64)
    o_tok = tl.where(o_p < sink_len, o_p.to(tl.int64), tl.where(m_sel, b_sel, local_start + o_p - sink_len - n_sel))
    p_k = k + o_tok[:, None] * stride_kt + i_h * stride_kh + o_h[None, :]
    b_k1 = tl.load(p_k, mask=m_p[:, None], other=0.0).to(tl.float32)
    b_k2 = tl.load(p_k + HALF, mask=m_p[:, None], other=0.0).to(tl.float32)
    o_c = o_p.to(tl.int64)[:, None] * HALF + o_h[None, :]
    b_c = tl.load(cos_t + o_c, mask=m_p[:, None], other=0.0).to(tl.float32)
    b_s = tl.load(sin_t + o_c, mask=m_p[:, None], other=0.0).to(tl.float32)
    p_w = ws + (i_h * L + o_p.to(tl.int64))[:, None] * D + o_h[None, :]
    tl.store(p_w, (b_k1 * b_c - b_k2 * b_s).to(ws.dtype.element_ty), mask=m_p[:, None])
    tl.store(p_w + HALF, (b_k2 * b_c + b_k1 * b_s).to(ws.dtype.element_ty), mask=m_p[:, None])
    if COPY_V:
        p_v = V + o_tok[:, None] * stride_kt + i_h * stride_kh + tl.arange(0, D)[None, :]
        b_v = tl.load(p_v, mask=m_p[:, None], other=0.0)
        tl.store(VW + (i_h * L + o_p.to(tl.int64))[:, None] * D + tl.arange(0, D)[None, :], b_v, mask=m_p[:, None])


@triton.jit
def _variant(q, k, v, ws, sel_idx, cos_t, sin_t, o, stride_qt, stride_qh, stride_kt, stride_kh, TQ, L, sink_len, n_sel,
             local_start, R, scale_log2, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, ROPE: tl.constexpr, GATHER: tl.constexpr):  # fmt: skip
    """One batch row; ROPE 0 none, 1 half rows fp32, 2 full rows fp32, 3 full rows in dtype, 4 pre-rotated."""
    HALF: tl.constexpr = D // 2
    i_m, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64)
    dtype = q.dtype.element_ty
    _, m_r, o_t, o_hq = group_rows(i_m, i_h, R, BM, G)
    o_hf = tl.arange(0, HALF)
    o_d = tl.arange(0, D)
    o_sw = (o_d + HALF) % D  # rotate_half: the other half of the row ...
    sgn = tl.where(o_d < HALF, -1.0, 1.0)  # ... with the first half negated
    o_c = tl.arange(0, BN)
    b_qpos = L - TQ + o_t
    p_q = q + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh
    b_qf = tl.load(p_q + o_d[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
    b_qs = tl.load(p_q + o_sw[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
    o_tq = b_qpos.to(tl.int64)[:, None] * HALF + (o_d % HALF)[None, :]
    b_cq = tl.load(cos_t + o_tq, mask=m_r[:, None], other=0.0).to(tl.float32)
    b_sq = tl.load(sin_t + o_tq, mask=m_r[:, None], other=0.0).to(tl.float32)
    b_qr = (b_qf * b_cq + sgn[None, :] * b_qs * b_sq).to(dtype)
    b_q1r, b_q2r = rotated_queries(p_q, b_qpos, m_r, cos_t, sin_t, HALF)

    t_hi = tl.minimum((i_m * BM + BM - 1) // G, TQ - 1)
    p_hi = L - TQ + t_hi + 1
    k_base = k + i_h * stride_kh
    v_base = v + i_h * stride_kh
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for p0 in range(0, p_hi, BN):
        o_p = p0 + o_c
        m_p = o_p < p_hi
        if GATHER:
            m_sel = (o_p >= sink_len) & (o_p < sink_len + n_sel) & m_p
            b_sel = tl.load(sel_idx + (o_p - sink_len), mask=m_sel, other=0).to(tl.int64)
            o_tok = tl.where(
                o_p < sink_len, o_p.to(tl.int64), tl.where(m_sel, b_sel, local_start + o_p - sink_len - n_sel)
            )
        else:
            o_tok = (local_start - L + o_p).to(tl.int64)
        p_k = k_base + o_tok[:, None] * stride_kt
        if ROPE == 1:
            b_k1 = tl.load(p_k + o_hf[None, :], mask=m_p[:, None], other=0.0).to(tl.float32)
            b_k2 = tl.load(p_k + HALF + o_hf[None, :], mask=m_p[:, None], other=0.0).to(tl.float32)
            o_tk = o_p.to(tl.int64)[:, None] * HALF + o_hf[None, :]
            b_ck = tl.load(cos_t + o_tk, mask=m_p[:, None], other=0.0).to(tl.float32)
            b_sk = tl.load(sin_t + o_tk, mask=m_p[:, None], other=0.0).to(tl.float32)
            b_s = tl.dot(b_q1r, tl.trans((b_k1 * b_ck - b_k2 * b_sk).to(dtype)))
            b_s = tl.dot(b_q2r, tl.trans((b_k2 * b_ck + b_k1 * b_sk).to(dtype)), b_s)
        elif ROPE == 4:
            p_w = ws + (i_h * L + o_p.to(tl.int64))[:, None] * D + o_d[None, :]
            b_s = tl.dot(b_qr, tl.trans(tl.load(p_w, mask=m_p[:, None], other=0.0)))
        else:
            b_k = tl.load(p_k + o_d[None, :], mask=m_p[:, None], other=0.0)
            if ROPE == 0:
                b_kr = b_k
            else:
                b_ks = tl.load(p_k + o_sw[None, :], mask=m_p[:, None], other=0.0)
                o_tk = o_p.to(tl.int64)[:, None] * HALF + (o_d % HALF)[None, :]
                b_ck = tl.load(cos_t + o_tk, mask=m_p[:, None], other=0.0)
                b_sk = tl.load(sin_t + o_tk, mask=m_p[:, None], other=0.0)
                if ROPE == 2:
                    b_kr = (
                        b_k.to(tl.float32) * b_ck.to(tl.float32)
                        + sgn[None, :] * b_ks.to(tl.float32) * b_sk.to(tl.float32)
                    ).to(dtype)
                else:
                    b_kr = b_k * b_ck + (sgn[None, :].to(dtype) * b_ks) * b_sk
            b_s = tl.dot(b_qr, tl.trans(b_kr.to(dtype)))
        b_s = tl.where(m_p[None, :] & (o_p[None, :] <= b_qpos[:, None]), b_s * scale_log2, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(v_base + o_tok[:, None] * stride_kt + o_d[None, :], mask=m_p[:, None], other=0.0)
        b_acc = tl.dot(b_p.to(dtype), b_v, b_acc * b_alpha[:, None])
        b_m = b_mn
    b_o = b_acc / b_l[:, None]
    p_o = o + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _step(q1, q2, k_base, v_base, sel_idx, cos_t, sin_t, p0, p_hi, b_qpos, b_m, b_l, b_acc, sink_len, n_sel,
          local_start, stride_kt, scale_log2, D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr,
          ROT: tl.constexpr):  # fmt: skip
    """One key tile of `_two_loops`: without ``MASK`` every row sees every key of the tile (no predicates)."""
    HALF: tl.constexpr = D // 2
    dtype = q1.dtype
    o_hf = tl.arange(0, HALF)
    o_d = tl.arange(0, D)
    o_p = p0 + tl.arange(0, BN)
    m_sel = (o_p >= sink_len) & (o_p < sink_len + n_sel)
    b_sel = tl.load(sel_idx + (o_p - sink_len), mask=m_sel, other=0).to(tl.int64)
    o_tok = tl.where(o_p < sink_len, o_p.to(tl.int64), tl.where(m_sel, b_sel, local_start + o_p - sink_len - n_sel))
    p_k = k_base + o_tok[:, None] * stride_kt
    o_tk = o_p.to(tl.int64)[:, None] * HALF + o_hf[None, :]
    if MASK:
        m_p = o_p < p_hi
        b_k1 = tl.load(p_k + o_hf[None, :], mask=m_p[:, None], other=0.0)
        b_k2 = tl.load(p_k + HALF + o_hf[None, :], mask=m_p[:, None], other=0.0)
        b_ck = tl.load(cos_t + o_tk, mask=m_p[:, None], other=0.0)
        b_sk = tl.load(sin_t + o_tk, mask=m_p[:, None], other=0.0)
    else:
        b_k1 = tl.load(p_k + o_hf[None, :])
        b_k2 = tl.load(p_k + HALF + o_hf[None, :])
        b_ck = tl.load(cos_t + o_tk)
        b_sk = tl.load(sin_t + o_tk)
    if ROT == 0:  # no rotation: a bound
        b_k1r = b_k1
        b_k2r = b_k2
    elif ROT == 2:  # rotation in the input dtype, as transformers rounds
        b_k1r = b_k1 * b_ck - b_k2 * b_sk
        b_k2r = b_k2 * b_ck + b_k1 * b_sk
    else:
        b_k1f, b_k2f, b_ckf, b_skf = b_k1.to(tl.float32), b_k2.to(tl.float32), b_ck.to(tl.float32), b_sk.to(tl.float32)
        b_k1r = (b_k1f * b_ckf - b_k2f * b_skf).to(dtype)
        b_k2r = (b_k2f * b_ckf + b_k1f * b_skf).to(dtype)
    b_s = tl.dot(q1, tl.trans(b_k1r))
    b_s = tl.dot(q2, tl.trans(b_k2r), b_s)
    if MASK:
        b_s = tl.where(m_p[None, :] & (o_p[None, :] <= b_qpos[:, None]), b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1) * scale_log2)
    b_p = tl.exp2(b_s * scale_log2 - b_mn[:, None])
    b_alpha = tl.exp2(b_m - b_mn)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    if MASK:
        b_v = tl.load(v_base + o_tok[:, None] * stride_kt + o_d[None, :], mask=m_p[:, None], other=0.0)
    else:
        b_v = tl.load(v_base + o_tok[:, None] * stride_kt + o_d[None, :])
    b_acc = tl.dot(b_p.to(dtype), b_v, b_acc * b_alpha[:, None])
    return b_mn, b_l, b_acc


@triton.jit
def _two_loops(q, k, v, sel_idx, cos_t, sin_t, o, stride_qt, stride_qh, stride_kt, stride_kh, TQ, L, sink_len, n_sel,
               local_start, R, scale_log2, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, SPLIT_LOOP: tl.constexpr, ROT: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    """The package's loop with its key tiles split into those every row sees in full (no mask) and the rest."""
    HALF: tl.constexpr = D // 2
    i_m, i_h = tl.program_id(0), tl.program_id(1).to(tl.int64)
    _, m_r, o_t, o_hq = group_rows(i_m, i_h, R, BM, G)
    o_d = tl.arange(0, D)
    b_qpos = L - TQ + o_t
    p_q = q + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh
    b_q1r, b_q2r = rotated_queries(p_q, b_qpos, m_r, cos_t, sin_t, HALF)

    t_lo = (i_m * BM) // G
    t_hi = tl.minimum((i_m * BM + BM - 1) // G, TQ - 1)
    p_hi = L - TQ + t_hi + 1
    # tiles wholly before the program's first query position are seen by all its rows
    p_free = ((L - TQ + t_lo + 1) // BN) * BN if SPLIT_LOOP else 0
    k_base = k + i_h * stride_kh
    v_base = v + i_h * stride_kh
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for p0 in tl.range(0, p_free, BN, warp_specialize=WS):
        b_m, b_l, b_acc = _step(b_q1r, b_q2r, k_base, v_base, sel_idx, cos_t, sin_t, p0, p_hi, b_qpos, b_m, b_l, b_acc,
                                sink_len, n_sel, local_start, stride_kt, scale_log2, D, BN, False, ROT)  # fmt: skip
    for p0 in range(p_free, p_hi, BN):
        b_m, b_l, b_acc = _step(b_q1r, b_q2r, k_base, v_base, sel_idx, cos_t, sin_t, p0, p_hi, b_qpos, b_m, b_l, b_acc,
                                sink_len, n_sel, local_start, stride_kt, scale_log2, D, BN, True, ROT)  # fmt: skip
    b_o = b_acc / b_l[:, None]
    p_o = o + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


def two_loops(q, kst, vst, sel, ns, kw, split_loop: bool, rot: int, cfg, ws: bool = False):
    _, tq, hq, d = q.shape
    h = kst.shape[2]
    g = hq // h
    L, cos_t, sin_t = scope_tables(q, kst, ns, kw)
    o = torch.empty_like(q)
    bm, bn, warps, stages = cfg
    rows = tq * g
    _two_loops[(triton.cdiv(rows, bm), h)](
        q, kst, vst, sel, cos_t, sin_t, o, q.stride(1), q.stride(2), kst.stride(1), kst.stride(2), tq, L,
        kw["sink_len"], ns, kw["local_start"], rows, kw["scale"] * 1.4426950408889634,
        H=h, G=g, D=d, BM=bm, BN=bn, SPLIT_LOOP=split_loop, ROT=rot, WS=ws, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o


def scope_tables(q, kst, ns, kw):
    """The scope's length ``L`` and its cos/sin tables ``[L, D/2]``, as the package kernel has them."""
    L = kw["sink_len"] + ns + kst.shape[1] - kw["local_start"]
    return (L, *cached_rope_table(kw["inv_freq"], L, kw["attention_scaling"], q.dtype, q.device))


def rotated_scope(kst, sel, ns, kw, L, cos_t, sin_t, vst=None):
    """The scope's rotated keys ``[H, L, D]`` (and, given ``vst``, its values) copied by `_prerotate`."""
    h, d = kst.shape[2], kst.shape[3]
    kw_ = torch.empty((h, L, d), dtype=kst.dtype, device=kst.device)
    vw = None if vst is None else torch.empty_like(kw_)
    _prerotate[(triton.cdiv(L, 64), h)](
        kst, sel, cos_t, sin_t, kw_, L, kw["sink_len"], ns, kw["local_start"], kst.stride(1), kst.stride(2),
        H=h, D=d, BP=64, V=vst, VW=vw, COPY_V=vst is not None,
    )  # fmt: skip
    return kw_, vw


def gather_scope(q, kst, vst, sel, ns, kw):
    """Rotated queries ``[1, HQ, TQ, D]``, rotated scope keys and scope values ``[1, H, L, D]``."""
    tq = q.shape[1]
    L, cos_t, sin_t = scope_tables(q, kst, ns, kw)
    kr, vr = rotated_scope(kst, sel, ns, kw, L, cos_t, sin_t, vst)
    qr = apply_rope_ref(q[0], cos_t[L - tq :].repeat(1, 2), sin_t[L - tq :].repeat(1, 2))
    return qr.transpose(0, 1)[None], kr[None], vr[None]


def gathered_sdpa(q, kst, vst, sel, ns, kw, backend: str, mask: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    qr, kr, vr = gather_scope(q, kst, vst, sel, ns, kw)
    tq, L = qr.shape[2], kr.shape[2]
    if mask == "lower_right":
        m = causal_lower_right(tq, L)
    else:
        m = torch.ones((tq, L), dtype=torch.bool, device=q.device).tril(L - tq)
    gqa = qr.shape[1] != kr.shape[1]
    if mask == "lower_right" and gqa:  # CausalBias does not pass enable_gqa on: expand the heads
        g = qr.shape[1] // kr.shape[1]
        kr, vr, gqa = kr.repeat_interleave(g, 1), vr.repeat_interleave(g, 1), False
    backends = list(SDPBackend.__members__.values()) if backend == "default" else [getattr(SDPBackend, backend)]
    with sdpa_kernel(backends):
        o = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=m, scale=kw["scale"], enable_gqa=gqa)
    return o[0].transpose(0, 1)[None]


ROPES = {"none": 0, "half": 1, "full": 2, "full16": 3, "pre": 4}


def variant(q, kst, vst, sel, ns, kw, rope: str, gather: bool, cfg):
    _, tq, hq, d = q.shape
    h = kst.shape[2]
    g = hq // h
    L, cos_t, sin_t = scope_tables(q, kst, ns, kw)
    o = torch.empty_like(q)
    ws = rotated_scope(kst, sel, ns, kw, L, cos_t, sin_t)[0] if rope == "pre" else q  # q: any tensor, not read
    bm, bn, warps, stages = cfg
    rows = tq * g
    _variant[(triton.cdiv(rows, bm), h)](
        q, kst, vst, ws, sel, cos_t, sin_t, o, q.stride(1), q.stride(2), kst.stride(1), kst.stride(2), tq, L,
        kw["sink_len"], ns, kw["local_start"], rows, kw["scale"] * 1.4426950408889634,
        H=h, G=g, D=d, BM=bm, BN=bn, ROPE=ROPES[rope], GATHER=gather, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o


def case(shape: str, dev: str):
    hq, h, d, tq, scope, t = SHAPES[shape]
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32

    def randn(*s):
        return torch.randn(*s, generator=gen, device=dev, dtype=dtype)

    sink = 32 if shape != "tiny" else 4
    local = scope - sink - (scope - sink) // 2 if shape == "tiny" else {"llama8b": 8192, "smollm2": 256}[shape]
    ns, local_start = scope - sink - local, t - local
    sel = torch.randperm(local_start - sink, device=dev, generator=gen)[:ns].sort().values.add(sink)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
    kw = {
        "sink_len": sink,
        "local_start": local_start,
        "inv_freq": inv_freq,
        "attention_scaling": 1.0,
        "scale": d**-0.5,
    }
    return randn(1, tq, hq, d), randn(1, t, h, d), randn(1, t, h, d), sel, ns, kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="compare outputs with the package kernel's, do not time")
    ap.add_argument("--package-only", action="store_true", help="time only the package kernel (and SDPA)")
    ap.add_argument("--configs", nargs="*", default=None, metavar="BM,BN,W,S", help="package block shapes to time")
    ap.add_argument("--splits", nargs="*", type=int, default=[1], help="scope splits to time each shape with (0: auto)")
    ap.add_argument(
        "--two-loops",
        action="store_true",
        help="only the package and `_two_loops` (mask-free tiles apart; rotation in fp32 or the dtype)",
    )
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, kst, vst, sel, ns, kw = case(args.model, dev)
    n_sel = torch.tensor([ns], device=dev)
    package = partial(scope_attention_fwd, q, kst, vst, sel[None], n_sel, **kw)
    cfgs = [(64, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3)]
    if args.configs:
        cfgs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    if dev == "cpu":
        cfgs = [(16, 16, 4, 1)]
    runs = [(r, gth, c) for r in ROPES for gth in (True, False) for c in cfgs if gth or r in ("half", "none")]
    # (split loop, rotation: 0 none / 1 fp32 / 2 dtype, warp-specialized mask-free loop, block shape)
    loops = [(sl, rot, ws, c) for c in cfgs for sl, rot, ws in
             ((False, 1, False), (True, 1, False), (True, 2, False), (True, 0, False), (True, 2, True))]  # fmt: skip
    if args.two_loops:
        runs = []
    if args.check:
        ref = package()[0].float()
        for cfg in cfgs:
            err = (package(config=cfg, splits=1)[0].float() - ref).abs().max().item()
            print(f"package {cfg}: max |diff| {err:.3e}")
            assert err < (5e-2 if dev == "cuda" else 1e-3), cfg
        for rope, gth, cfg in runs:
            if not gth or rope == "none":  # no rotation is a different function on purpose
                continue
            try:
                err = variant(q, kst, vst, sel, ns, kw, rope, gth, cfg).float() - ref
            except OutOfResources:  # reported as an error row when timing, too
                print(f"{rope:7s} gather={gth} {cfg}: does not fit this device")
                continue
            print(f"{rope:7s} gather={gth} {cfg}: max |diff| {err.abs().max().item():.3e}")
            assert err.abs().max().item() < (5e-2 if dev == "cuda" else 1e-3), (rope, cfg)
        for sl, rot, ws, cfg in loops if args.two_loops else []:
            if rot == 0:  # no rotation is a different function on purpose
                continue
            try:
                err = (two_loops(q, kst, vst, sel, ns, kw, sl, rot, cfg, ws).float() - ref).abs().max().item()
            except Exception as exc:  # noqa: BLE001  (a loop Triton cannot build here is reported)
                print(f"two_loops split_loop={sl} rot={rot} ws={ws} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            print(f"two_loops split_loop={sl} rot={rot} ws={ws} {cfg}: max |diff| {err:.3e}")
            assert err < (5e-2 if dev == "cuda" else 1e-3), (sl, rot, ws, cfg)
        return

    timer = Timer(torch)
    hq, _, d, tq, scope, t = SHAPES[args.model]
    pairs = tq * (scope - tq) + tq * (tq + 1) // 2
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_rev(), "model": args.model, "TQ": tq, "scope": scope, "store": t}  # fmt: skip
    rows = []

    def emit(**row):
        row = {**meta, **row}
        if "graph_ms" in row:
            row["TFLOPs"] = round(4 * pairs * hq * d / row["graph_ms"] / 1e9, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def time(fn):
        try:
            return {"graph_ms": round(timer.graph_ms(fn), 4)}
        except Exception as exc:  # noqa: BLE001  (a shape that does not fit the chip is reported)
            return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}

    emit(kind="package", config="default", **time(package))
    emit(kind="package", config="default, one split", **time(partial(package, splits=1)))
    for cfg in cfgs:
        for n in args.splits:
            emit(
                kind="package",
                config=list(cfg),
                splits=n or "auto",
                **time(partial(package, splits=n or None, config=cfg)),
            )
    for sl, rot, ws, cfg in loops if args.two_loops else []:
        emit(kind="two_loops", split_loop=sl, rotation=("none", "fp32", "dtype")[rot], warp_specialize=ws,
             config=list(cfg), **time(partial(two_loops, q, kst, vst, sel, ns, kw, sl, rot, cfg, ws)))  # fmt: skip
    if args.two_loops:
        return finish(args.out, rows)
    for rope, gth, cfg in [] if args.package_only else runs:
        emit(kind="variant", rope=rope, gather=gth, config=list(cfg),
             **time(partial(variant, q, kst, vst, sel, ns, kw, rope, gth, cfg)))  # fmt: skip
    qg, kg, vg = gather_rotate(q, kst, vst, sel[None], kw)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    emit(kind="sdpa_gathered", **time(partial(sdpa, qg, kg, vg, scale=kw["scale"])))
    if args.package_only:
        return finish(args.out, rows)
    # the gathered path end to end: the scope's rotated keys and values copied by one kernel, then SDPA
    # with a lower-right causal mask, each backend forced; `diff` against the package kernel
    ref = package()[0]
    emit(kind="gather_only", **time(partial(gather_scope, q, kst, vst, sel, ns, kw)))
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "default"):
        for mask in ("lower_right", "bool"):
            fn = partial(gathered_sdpa, q, kst, vst, sel, ns, kw, backend, mask)
            try:
                diff = (fn().float() - ref.float()).abs().max().item()
            except Exception as exc:  # noqa: BLE001  (a backend that refuses the inputs is reported)
                emit(kind="gathered_sdpa", backend=backend, mask=mask, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                continue
            emit(kind="gathered_sdpa", backend=backend, mask=mask, max_diff=diff, **time(fn))
    finish(args.out, rows)


def finish(out: Path | None, rows: list[dict]) -> None:
    if out:
        with out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
