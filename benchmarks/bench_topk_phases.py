"""Two-phase prefill scoring against one pass, by key-range length, block configuration and sub-tile size.

    python3 benchmarks/bench_topk_phases.py > benchmarks/results/topk-phases-<gpu>-<commit>.jsonl
    python3 benchmarks/bench_topk_phases.py --subtiles 1 2 4 --prefill-only > ...   # phase 1's sub-tiles
    python3 benchmarks/bench_topk_phases.py --tile-rescore 16x4 32x4 --prefill-only > ...   # phase 2 by tile

One JSON line per (shape, data): ``one`` is the one-pass kernel's CUDA-graph time in ms (L2 flushed),
``two-<BM>x<BN>x<warps>w<stages>s`` the two-phase kernels' (phase 1 with tiles of BM rows and BN keys,
phase 2 rescoring each row's best tiles; with ``--subtiles``, ``...s-s<S>``: phase 1 ranks S sub-tiles of
BN / S keys per tile and phase 2 rescores those), and ``tflops`` the best two-phase time as
``2 * rows * keys * D`` flops per second. ``randn`` keys are i.i.d.; ``heavy`` scales every 4096th key by 4 (a few keys that
many rows share, as real attention has). Every two-phase result is checked equal to the one-pass
result (up to fp32 rounding: `same_up_to_rounding`) before it is timed. This chose
``_TWO_PHASE_MIN_ROWS`` and the two-phase block shape in ``kernels/triton_ops/topk.py``.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

from bench_kernels import MODELS, Timer, ensure_importable

ensure_importable()  # reattention_kernels from a plain checkout

import torch

from reattention_kernels.triton_ops.topk import score_topk_fwd

timer = Timer(torch)
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)


def randn(*s: int) -> torch.Tensor:
    return torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--subtiles", type=int, nargs="+", help="time phase 1 with these sub-tiles per tile (1, 2, 4)")
parser.add_argument("--prefill-only", action="store_true", help="skip the short chunks (2-32 query tokens)")
parser.add_argument("--configs", nargs="+", metavar="BMxBNxWARPSxSTAGES", help="phase 1 shapes to time instead of SWEEP")
parser.add_argument("--tile-rescore", nargs="+", metavar="WxWARPS",
                    help="time phase 2 by rows (two-rows) against by tiles (two-tiles-WxWARPS: W pairs per program)")
args = parser.parse_args()

shapes = [("SmolLM2-135M", 256, tk, 4) for tk in (16384, 32768, 65536, 131072, 262144, 524288, 1048576)]
shapes += [("SmolLM2-135M", 2048, 131072, 8), ("Llama-3.1-8B", 2048, 131072, 8), ("Llama-3.1-8B", 512, 32768, 8)]
# the engine's Llama-8B prefill chunk (512 tokens, the default top-4) late in a 128K prompt
shapes += [("Llama-3.1-8B", 512, 131072, 4)]
if not args.prefill_only:
    # short chunks (a prompt's remainder): where one pass may still win
    shapes += [("SmolLM2-135M", tq, tk, 4) for tq in (2, 8, 32) for tk in (131072, 1048576)]


# phase 1's (BM, BN, warps, stages): the frontier of a wider sweep (results/topk-phases-h100-bc3cc63.jsonl)
SWEEP = [(128, 64, 4, 3), (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3)]
if args.configs:
    SWEEP = [tuple(int(x) for x in c.split("x")) for c in args.configs]
RESCORE = [(16, 32, 32, 4), (16, 64, 16, 4), (16, 64, 16, 8), (8, 64, 32, 4), (4, 64, 32, 4), (32, 32, 16, 8)]
RESCORE += [(4, 32, 64, 4), (2, 64, 64, 4), (1, 64, 64, 4)]


def same_up_to_rounding(q, keys, out, ref) -> bool:
    """True where ``out`` and ``ref`` are equal, or differ only among keys whose fp64 scores tie to
    1e-6 relative: one pass accumulates with tensor cores, phase 2 with a plain fp32 sum, and on
    i.i.d. keys a few of ~65K rows hold two such keys (benchmarks/probe_topk_rounding.py)."""
    bad = (out != ref).any(-1)
    for b, t, hh in bad.nonzero().tolist():
        qq, kk = q[b, t, hh].double(), keys[b, :, hh // (q.shape[2] // keys.shape[2])].double()
        so = (kk[out[b, t, hh]] @ qq).sort(descending=True).values
        sr = (kk[ref[b, t, hh]] @ qq).sort(descending=True).values
        if (so - sr).abs().max() > 1e-6 * sr.abs().max():
            return False
    return True


def graph_ms(q, k, top_k: int, **kw) -> float:
    return round(timer.graph_ms(partial(score_topk_fwd, q, k, top_k, **kw)), 4)


for model, tq, tk, top_k in shapes:
    hq, h, d = MODELS[model]
    k = randn(1, tk + 260, h, d)[:, 4 : 4 + tk]
    q = randn(1, tq, hq, d)
    heavy = k.clone()
    heavy[:, ::4096] *= 4
    for data, keys in (("randn", k), ("heavy", heavy)):
        ref = score_topk_fwd(q, keys, top_k, two_phase=False)
        row = {"model": model, "tq": tq, "tk": tk, "data": data, "one": graph_ms(q, keys, top_k, two_phase=False)}
        if args.subtiles:
            variants = [
                ("two-{}x{}x{}w{}s-s{}".format(*cfg, sub), {"config": cfg, "subtiles": sub})
                for cfg in SWEEP
                for sub in args.subtiles
            ]
        else:
            variants = [("two-{}x{}x{}w{}s".format(*cfg), {"config": cfg}) for cfg in SWEEP]
        if args.tile_rescore:
            variants = [("two-rows", {"rescore_by": "rows"})] + [
                (f"two-tiles-{c}", {"tile_rescore": tuple(int(x) for x in c.split("x"))}) for c in args.tile_rescore
            ]
        elif tq >= 256 and not args.subtiles:
            # phase 2's (rows per program, keys per step, head dims per step, warps), phase 1 at the default
            variants += [("rescore-{}x{}x{}w{}".format(*rc), {"rescore": rc}) for rc in RESCORE]
        for name, kw in variants:
            try:
                out = score_topk_fwd(q, keys, top_k, two_phase=True, **kw)
            except Exception as exc:  # noqa: BLE001  (a configuration that does not compile is reported)
                row[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
                continue
            if not same_up_to_rounding(q, keys, out, ref):
                raise SystemExit(f"two phases differ from one pass: {model} {tq}x{tk} {data} {name}")
            row[name] = graph_ms(q, keys, top_k, two_phase=True, **kw)
        best = min(v for n, v in row.items() if n.startswith("two-") and isinstance(v, float))
        row["tflops"] = round(2 * tq * hq * tk * d / best / 1e9, 1)
        print(json.dumps(row), flush=True)
    del k, heavy, q
