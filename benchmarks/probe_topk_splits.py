"""How many key splits should prefill scoring take? The package's kernel with its split count forced.

    python3 benchmarks/probe_topk_splits.py [--splits 0 1 2 3 4 6] [--out FILE.jsonl]

``score_topk_fwd`` picks ``ceil(2 * SMs / programs)`` splits, which for a Llama-8B prefill chunk
(512 queries x 32 heads: 128 row-block programs on an H100's 132 SMs) gives 3 splits and 384
programs, one and a half waves of two programs per SM. This times the package (both phases, top-4,
bf16, CUDA-graph replays with the L2 flushed) at the engine's chunk shapes with each split count
(0: the default), after checking every result equal to the default's.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

from bench_kernels import Timer, ensure_importable, git_rev

ensure_importable()

import torch
import triton

from reattention_kernels.triton_ops.topk import score_topk_fwd

SHAPES = {  # name: (TQ, HQ, H, D, keys)
    "llama8b-512x128K": (512, 32, 8, 128, 131072),
    "llama8b-512x32K": (512, 32, 8, 128, 32768),
    "llama8b-2048x128K": (2048, 32, 8, 128, 131072),
    "llama8b-1024x128K": (1024, 32, 8, 128, 131072),
    "smollm2-256x128K": (256, 9, 3, 64, 131072),
    "smollm2-256x1M": (256, 9, 3, 64, 1048576),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", nargs="+", type=int, default=[0, 1, 2, 3, 4, 6])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    timer = Timer(torch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes:
        tq, hq, h, d, tk = SHAPES[name]
        q = torch.randn(1, tq, hq, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, tk, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        want = score_topk_fwd(q, k, 4)
        for s in args.splits:
            fn = partial(score_topk_fwd, q, k, 4, splits=s or None)
            row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "commit": git_rev(), "shape": name, "splits": s or "auto", "same": bool(torch.equal(fn(), want))}  # fmt: skip
            ms = timer.graph_ms(fn)
            row.update(graph_ms=round(ms, 4), TFLOPs=round(2 * tq * hq * tk * d / ms / 1e9, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
