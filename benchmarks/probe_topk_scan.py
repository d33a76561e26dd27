"""Where the prefill scoring's phase 1 spends its time: the same tile loop with four ways to keep each row's best tiles.

    python3 benchmarks/probe_topk_scan.py [--out results.jsonl]

The package's scan kernel (``kernels/triton_ops/topk.py``, two phases) scores every tile of keys
with one ``tl.dot`` and enters each row's tile maximum into the row's set of its ``TOPK`` best tile
maxima, a ``[BM, KP]`` (value, index) set. This probe runs the same loop (the package's own
``_scores``, ``_tile_maxima`` and set helpers, one KV head per program, the package's key splits)
with the bookkeeping swapped:

* ``set``: the package's phase 1 (``_tile_maxima``, ``_keep_best`` on the ``[BM, KP]`` set);
* ``max``: a running maximum per row only, no set (a bound: what the dot and row maximum cost);
* ``store``: each tile's row maxima written to a ``[rows, tiles]`` workspace, no set (phase 2 would
  then pick each row's best tiles from it);
* ``insert4``: the set as four sorted ``[BM]`` vectors, updated by an insertion network (top-4 only).

It checks ``insert4`` against ``set`` (same values and tiles, in the same order) and ``store``
against ``max``, then times each variant as a CUDA-graph replay with the L2 flushed, and the package's
whole two-phase ``score_topk_fwd`` beside them. TFLOP/s count ``2 * TQ * HQ * TK * D``.

``--package`` also times the package's two phases with two sub-tiles per tile (``sub2``) and with
one (``sub1``), each compared with the default (``rows_differ``); the package's time minus ``set`` is phase 2's (the
split merge and the rescoring). At 93f2670 it also timed phase 2 as 1, 2 or 4 persistent programs per
SM walking the row blocks in order (``persist-P``, results/probe-topk-rescore-h100-93f2670.jsonl):
never faster, so that option was dropped; at 94861d3 it timed phase 2 rescoring each step's gathered keys of
all rows with one ``tl.dot`` (``dot``, results/probe-topk-rescore-dot-h100-94861d3.jsonl): slower everywhere
(the gathers, not the CUDA-core sums, set phase 2's time), so that option was dropped too.
"""

from __future__ import annotations

import argparse
import platform
from functools import partial
from pathlib import Path

from bench_kernels import MODELS, Timer, ensure_importable, git_rev

ensure_importable()  # before anything imports reattention_kernels

import torch
import triton
import triton.language as tl
from probe_decode_select import emit

from reattention_kernels.triton_ops import topk as T
from reattention_kernels.triton_ops.rows import group_rows

VARIANTS = {"set": 0, "max": 1, "store": 2, "insert4": 3}


@triton.jit
def _insert4(b_x, i_x, v0, v1, v2, v3, i0, i1, i2, i3):
    """Enter ``b_x [BM]`` (tile ``i_x``) into each row's sorted four (``v0 >= v1 >= v2 >= v3``); a
    strict ``>`` keeps an earlier (lower) tile ahead of an equal later one, as the tie rule wants."""
    c0 = b_x > v0
    c1 = b_x > v1
    c2 = b_x > v2
    c3 = b_x > v3
    v3n = tl.where(c2, v2, tl.where(c3, b_x, v3))
    i3n = tl.where(c2, i2, tl.where(c3, i_x, i3))
    v2n = tl.where(c1, v1, tl.where(c2, b_x, v2))
    i2n = tl.where(c1, i1, tl.where(c2, i_x, i2))
    v1n = tl.where(c0, v0, tl.where(c1, b_x, v1))
    i1n = tl.where(c0, i0, tl.where(c1, i_x, i1))
    v0n = tl.where(c0, b_x, v0)
    i0n = tl.where(c0, i_x, i0)
    return v0n, v1n, v2n, v3n, i0n, i1n, i2n, i3n


@triton.jit
def probe_scan_kernel(q, k, ws_v, ws_i, wsm, stride_qt, stride_qh, stride_kt, stride_kh, TK, R, NSPLIT,
                      keys_per_split, NT, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
                      KP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    i_m, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_r, m_r, o_t, o_hq = group_rows(i_m, i_h, R, BM, G)
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, BN)
    o_j = tl.arange(0, KP)
    b_q = tl.load(q + o_t[:, None] * stride_qt + o_hq[:, None] * stride_qh + o_d[None, :], mask=m_r[:, None], other=0.0)
    k_base = k + i_h * stride_kh
    n_lo = i_s * keys_per_split
    n_hi = tl.minimum(n_lo + keys_per_split, TK)  # the probe's key counts are multiples of BN: no tail
    o_w = (i_h * R + o_r).to(tl.int64) * NSPLIT + i_s
    if MODE == 0:
        b_v, b_i, b_kth = T._empty_set(BM, KP, TOPK)
        for n0 in range(n_lo, n_hi, BN):
            p_k = k_base + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
            b_v, b_i, b_kth = T._tile_maxima(b_q, p_k, n0, n_hi, o_c, b_v, b_i, b_kth, o_j, KP, BN, 1, False, False)
        T._store_sorted(b_v, b_i, o_j, ws_i + o_w * TOPK, ws_v + o_w * TOPK, m_r, TOPK, KP, True)
    elif MODE == 1:
        b_best = tl.full([BM], float("-inf"), dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BN):
            p_k = k_base + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
            b_best = tl.maximum(b_best, tl.max(T._scores(b_q, p_k, n0, n_hi, o_c, False, False), 1))
        tl.store(ws_v + o_w * TOPK, b_best, mask=m_r)
    elif MODE == 2:
        p_m = wsm + (i_h * R + o_r).to(tl.int64) * NT
        for n0 in range(n_lo, n_hi, BN):
            p_k = k_base + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
            tl.store(p_m + n0 // BN, tl.max(T._scores(b_q, p_k, n0, n_hi, o_c, False, False), 1), mask=m_r)
    else:
        v0 = tl.full([BM], float("-inf"), dtype=tl.float32)
        v1, v2, v3 = v0, v0, v0
        i0 = tl.full([BM], -1, dtype=tl.int32)
        i1, i2, i3 = i0, i0, i0
        for n0 in range(n_lo, n_hi, BN):
            p_k = k_base + (n0 + o_c).to(tl.int64)[:, None] * stride_kt + o_d[None, :]
            b_x = tl.max(T._scores(b_q, p_k, n0, n_hi, o_c, False, False), 1)
            v0, v1, v2, v3, i0, i1, i2, i3 = _insert4(b_x, n0 // BN, v0, v1, v2, v3, i0, i1, i2, i3)
        p_v = ws_v + o_w * TOPK
        p_i = ws_i + o_w * TOPK
        tl.store(p_v, v0, mask=m_r)
        tl.store(p_v + 1, v1, mask=m_r)
        tl.store(p_v + 2, v2, mask=m_r)
        tl.store(p_v + 3, v3, mask=m_r)
        tl.store(p_i, i0, mask=m_r)
        tl.store(p_i + 1, i1, mask=m_r)
        tl.store(p_i + 2, i2, mask=m_r)
        tl.store(p_i + 3, i3, mask=m_r)


def launch(q, k, mode: str, config, ws_v, ws_i, wsm, splits, keys_per_split):
    _, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    g = hq // h
    rows = tq * g
    bm, bn, warps, stages = config
    probe_scan_kernel[(triton.cdiv(rows, bm), splits, h)](
        q, k, ws_v, ws_i, wsm, q.stride(1), q.stride(2), k.stride(1), k.stride(2), tk, rows, splits, keys_per_split,
        tk // bn, H=h, G=g, D=d, TOPK=4, KP=4, BM=bm, BN=bn, MODE=VARIANTS[mode], num_warps=warps, num_stages=stages,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="append JSON lines here (default: stdout only)")
    ap.add_argument(
        "--configs", nargs="+", metavar="BMxBNxWARPSxSTAGES", help="phase 1 shapes (default: the package's)"
    )
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--package", action="store_true", help="also time the package's phase 2 variants")
    ap.add_argument("--shapes", nargs="+", metavar="MODEL:TQ:TK", help="e.g. Llama-3.1-8B:512:32768")
    args = ap.parse_args()
    timer = Timer(torch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [("Llama-3.1-8B", 512, 131072), ("Llama-3.1-8B", 2048, 131072), ("SmolLM2-135M", 256, 131072),
              ("SmolLM2-135M", 256, 1048576)]  # fmt: skip
    if args.shapes:
        shapes = [(m, int(tq), int(tk)) for m, tq, tk in (x.split(":") for x in args.shapes)]
    for model, tq, tk in shapes:
        hq, h, d = MODELS[model]
        q = torch.randn(1, tq, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, tk, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        rows = tq * (hq // h)
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs or []] or [
            T._config(rows, q.dtype, d, True)
        ]
        for config in configs:
            probe(timer, args, model, q, k, config)
        del q, k


def probe(timer: Timer, args: argparse.Namespace, model: str, q: torch.Tensor, k: torch.Tensor, config) -> None:
    """Check and time every variant of phase 1 at one block shape; the package's two phases beside them."""
    _, tq, hq, d = q.shape
    tk, h = k.shape[1], k.shape[2]
    rows = tq * (hq // h)
    bm, bn = config[0], config[1]
    base = h * triton.cdiv(rows, bm)
    splits, keys_per_split = T._key_splits(tk, base, q.device)  # the package's splits
    ws = {m: (torch.full((h * rows * splits * 4,), float("-inf"), device="cuda"),
              torch.full((h * rows * splits * 4,), -1, dtype=torch.int32, device="cuda")) for m in VARIANTS}  # fmt: skip
    wsm = torch.empty(h * rows * (tk // bn), device="cuda")
    for m in VARIANTS:
        launch(q, k, m, config, *ws[m], wsm, splits, keys_per_split)
    torch.cuda.synchronize()
    same_set = torch.equal(ws["set"][0], ws["insert4"][0]) and torch.equal(ws["set"][1], ws["insert4"][1])
    best_of_store = wsm.view(h * rows, tk // bn).amax(1)
    best_of_max = ws["max"][0].view(h * rows, splits, 4)[:, :, 0].amax(1)
    same_max = torch.equal(best_of_store, best_of_max) and torch.equal(
        best_of_max, ws["set"][0].view(h * rows, splits, 4)[:, :, 0].amax(1)
    )
    if not (same_set and same_max):
        raise SystemExit(f"variants disagree at {model} {tq}x{tk}: insert4==set {same_set}, maxima {same_max}")
    flops = 2 * tq * hq * tk * d
    row = {"model": model, "tq": tq, "tk": tk, "top_k": 4, "config": list(config), "splits": splits}
    for m in args.variants:
        ms = timer.graph_ms(partial(launch, q, k, m, config, *ws[m], wsm, splits, keys_per_split))
        row[m] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
    ms = timer.graph_ms(partial(T.score_topk_fwd, q, k, 4, config=tuple(config), two_phase=True))
    row["package"] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
    if args.package:
        ref = T.score_topk_fwd(q, k, 4, config=tuple(config), two_phase=True)
        kws = {"sub1": {"subtiles": 1}, "sub2": {"subtiles": 2}}
        for name, kw in kws.items():
            fn = partial(T.score_topk_fwd, q, k, 4, config=tuple(config), two_phase=True, **kw)
            try:
                # tensor-core sums may order two keys whose scores differ in the last bits differently
                differ = int((fn() != ref).any(-1).sum())
            except Exception as exc:  # noqa: BLE001  (a shape that does not fit is reported)
                row[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
                continue
            ms = timer.graph_ms(fn)
            row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "rows_differ": differ}
    row.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), commit=git_rev())  # fmt: skip
    emit(row, None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
