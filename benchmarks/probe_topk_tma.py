"""Would TMA key loads lift prefill scoring's tile loop? A bound, not the package's kernel (a design aid).

    python benchmarks/probe_topk_tma.py [--model llama8b|smollm2] [--keys N] [--out FILE.jsonl] [--check]

Prefill scoring's phase 1 runs at 56-59% of the bf16 peak, and a bare ``q . k`` with a running row
maximum (its bound) at 57% (benchmarks/README.md, "Prefill scoring: what each phase costs"). The
middle of the key store is contiguous per (sequence, KV head), so unlike the scope attention's gathered
rows its tiles could come through the tensor memory accelerator. This times that bound twice, with the
package's GQA row layout (rows ``r = t * G + g``) and key splits: key tiles read through pointers
(as the package does) and through a device-side tensor descriptor (``tl.make_tensor_descriptor`` over
one sequence's ``[T, H, D]``, blocks of ``[BN, 1, D]``). Both return each row's maximum score per split; ``--check``
compares them with torch (any device; under ``TRITON_INTERPRET=1`` on a CPU with tiny shapes).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import Timer, ensure_importable, git_rev

ensure_importable()
from reattention_kernels.triton_ops.rows import group_rows

SHAPES = {  # (HQ, H, D, TQ)
    "llama8b": (32, 8, 128, 512),
    "smollm2": (9, 3, 64, 256),
    "tiny": (4, 2, 64, 8),
}


@triton.jit
def _row_max(q, k, out, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, T, TK, R, keys_per_split,
             H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             TMA: tl.constexpr):  # fmt: skip
    """Row maxima of ``q . k`` over keys ``[i_s * keys_per_split, ...)`` of the first ``TK``; one batch row of q."""
    i_m, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    _, m_r, o_t, o_hq = group_rows(i_m, i_h, R, BM, G)
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, BN)
    b_q = tl.load(q + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_d[None, :],
                  mask=m_r[:, None], other=0.0)  # fmt: skip
    n_lo = i_s * keys_per_split
    n_hi = tl.minimum(n_lo + keys_per_split, TK)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    if TMA:
        desc = tl.make_tensor_descriptor(k + i_b * stride_kb, shape=[T, H, D], strides=[stride_kt, stride_kh, 1],
                                         block_shape=[BN, 1, D])  # fmt: skip
    n_full = n_lo + (n_hi - n_lo) // BN * BN
    for n0 in range(n_lo, n_full, BN):
        if TMA:
            b_k = desc.load([n0, i_h.to(tl.int32), 0]).reshape(BN, D)
        else:
            b_k = tl.load(k + i_b * stride_kb + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + i_h * stride_kh
                          + o_d[None, :])  # fmt: skip
        b_m = tl.maximum(b_m, tl.max(tl.dot(b_q, tl.trans(b_k)), 1))
    for n0 in range(n_full, n_hi, BN):  # the masked tail, through pointers either way
        m_n = (n0 + o_c) < n_hi
        b_k = tl.load(k + i_b * stride_kb + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + i_h * stride_kh
                      + o_d[None, :], mask=m_n[:, None], other=0.0)  # fmt: skip
        b_s = tl.where(m_n[None, :], tl.dot(b_q, tl.trans(b_k)), float("-inf"))
        b_m = tl.maximum(b_m, tl.max(b_s, 1))
    tl.store(out + (i_bh * tl.num_programs(1) + i_s).to(tl.int64) * R + i_m * BM + tl.arange(0, BM), b_m, mask=m_r)


def row_max(q, k, tk: int, tma: bool, cfg, splits: int):
    """``[H, splits, R]`` row maxima of batch row 0's queries ``q [1, TQ, HQ, D]`` against ``k[0, :tk]``."""
    _, tq, hq, d = q.shape
    _, t, h, _ = k.shape
    g = hq // h
    rows = tq * g
    bm, bn, warps, stages = cfg
    per = triton.cdiv(triton.cdiv(tk, splits), bn) * bn
    splits = triton.cdiv(tk, per)
    out = torch.empty((h, splits, rows), dtype=torch.float32, device=q.device)
    _row_max[(triton.cdiv(rows, bm), splits, h)](
        q, k, out, q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), t, tk, rows, per,
        H=h, G=g, D=d, BM=bm, BN=bn, TMA=tma, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def reference(q, k, tk: int, splits_out: torch.Tensor) -> torch.Tensor:
    """The overall row maxima ``[H, R]`` in fp32, to compare with ``splits_out.amax(1)``."""
    _, tq, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    qf = q[0].float().reshape(tq, h, g, d).permute(1, 0, 2, 3).reshape(h, tq * g, d)
    kf = k[0, :tk].float().permute(1, 2, 0)
    return (qf @ kf).amax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--keys", type=int, default=131072)
    ap.add_argument("--configs", nargs="*", default=None, metavar="BM,BN,W,S")
    ap.add_argument("--splits", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hq, h, d, tq = SHAPES[args.model]
    tk = args.keys if args.model != "tiny" else 300
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(1, tq, hq, d, generator=gen, device=dev, dtype=dtype)
    k = torch.randn(1, tk + 64, h, d, generator=gen, device=dev, dtype=dtype)  # a longer buffer, as the store is
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    cfgs = (
        [tuple(int(x) for x in c.split(",")) for c in args.configs]
        if args.configs
        else (
            [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4)] if dev == "cuda" else [(16, 16, 4, 1)]
        )
    )
    runs = [(tma, cfg, s) for cfg in cfgs for s in args.splits for tma in (False, True)]
    if args.check:
        for tma, cfg, s in runs:
            got = row_max(q, k, tk - 5, tma, cfg, s).amax(1)
            err = (got - reference(q, k, tk - 5, got)).abs().max().item()
            print(f"tma={tma} {cfg} splits={s}: max |diff| {err:.3e}")
            assert err < (5e-2 if dev == "cuda" else 1e-3), (tma, cfg, s)
        return
    timer = Timer(torch)
    flops = 2 * tq * hq * tk * d
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_rev(), "model": args.model, "TQ": tq, "keys": tk}  # fmt: skip
    rows = []
    for tma, cfg, s in runs:
        row = {**meta, "tma": tma, "config": list(cfg), "splits": s}
        try:
            ms = timer.graph_ms(partial(row_max, q, k, tk, tma, cfg, s))
            row.update(graph_ms=round(ms, 4), TFLOPs=round(flops / ms / 1e9, 1))
        except Exception as exc:  # noqa: BLE001  (a shape that does not build here is reported)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
