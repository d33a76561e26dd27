"""Where two-phase prefill scoring's time goes, kernel by kernel, for phase 2 by rows and by tiles (a design aid).

    python3 benchmarks/probe_topk_phase2.py [--shapes smollm2:256:16384 llama8b:512:131072 ...]
                                            [--tile-rescore 16x4 ...] [--subtiles 1 2] [--out FILE.jsonl]

Runs ``score_topk_fwd`` (the package's two phases: as by default; by default but without TMA loads in
phase 1; ``rescore_by="rows"``; ``"tiles"`` with each ``--tile-rescore`` (pairs per program x warps); and
by default with each ``--subtiles``) under ``torch.profiler`` with the L2 flushed before every call, and
prints each kernel's mean device time in microseconds per call: phase 1's scan, and phase 2's kernels
(by rows one; by tiles the tile pick with its counts, the prefix sum, the placing scatter, the
rescoring and the merge). i.i.d. keys and queries, bf16, top-4.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import ensure_importable, git_rev

ensure_importable()
import triton

from reattention_kernels.triton_ops.topk import score_topk_fwd

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}


def kernel_us(fn, reps: int, flush: torch.Tensor) -> dict[str, float]:
    """Mean device microseconds per call of each kernel launched by ``fn`` and the L2 flush before it."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:60]] += ev.device_time / reps
    return dict(total)


def call_us(fn, reps: int, flush: torch.Tensor, base: dict[str, float]) -> dict[str, float]:
    """`kernel_us` less the flush's own kernels (``base``: `kernel_us` of a call that does nothing)."""
    us = {name: t - base.get(name, 0.0) for name, t in kernel_us(fn, reps, flush).items()}
    return {name: round(t, 1) for name, t in sorted(us.items(), key=lambda kv: -kv[1]) if t > 0.05}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["smollm2:256:16384", "smollm2:256:131072", "llama8b:512:32768",
                                                    "llama8b:512:131072"])  # fmt: skip
    ap.add_argument("--tile-rescore", nargs="*", default=["16x4"])
    ap.add_argument("--subtiles", nargs="*", type=int, default=[], help="also phase 1 with these sub-tiles per tile")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_rev()}  # fmt: skip
    base = kernel_us(lambda: None, args.reps, flush)
    rows = []
    for spec in args.shapes:
        model, tq, tk = spec.split(":")
        hq, h, d = SHAPES[model]
        tq, tk = int(tq), int(tk)
        q = torch.randn(1, tq, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, tk + 64, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)[:, 8 : 8 + tk]
        variants = [("default", {}), ("default-no-tma", {"tma": False}), ("rows", {"rescore_by": "rows"})]
        variants += [(f"default-subtiles-{n}", {"subtiles": n}) for n in args.subtiles]
        variants += [(f"tiles-{c}", {"tile_rescore": tuple(int(x) for x in c.split("x")), "rescore_by": "tiles"})
                     for c in args.tile_rescore]  # fmt: skip
        ref = None
        for name, kw in variants:
            out = score_topk_fwd(q, k, 4, two_phase=True, **kw)
            ref = out if ref is None else ref
            differ = int((out != ref).any(-1).sum())
            us = call_us(partial(score_topk_fwd, q, k, 4, two_phase=True, **kw), args.reps, flush, base)
            row = {**meta, "model": model, "TQ": tq, "keys": tk, "phase2": name, "rows_differ_from_default": differ,
                   "total_us": round(sum(us.values()), 1), "kernels_us": us}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
