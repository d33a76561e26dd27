"""Time a decode step's scoring (split scan + split merge) with other split counts and merge shapes.

    python3 benchmarks/probe_decode_merge.py [--tokens 131072 1048576] [--out FILE]

The embedded preset's shapes (9 query / 3 KV heads, head dim 64, top-4), one query token over a
middle of ``--tokens`` keys, bf16, as a CUDA-graph replay (the engine's decode step records the
same launches). Variants: the number of key splits of the scan (the default is about two programs
per SM) and the merge's (rows per program, candidates per step, warps). Each variant's hits are
checked equal to the default's first; `torch.profiler` gives each kernel's device time per replay.
One JSON line per (tokens, variant).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import capture_graph, replay_ms
from probe_decode_select import emit, kernels

# (splits, merge (rows per program, candidates per step, warps)); None = the kernel's default
VARIANTS = [
    (None, None),
    (None, (4, 512, 4)),
    (None, (4, 512, 8)),
    (None, (4, 256, 8)),
    (None, (1, 256, 4)),
    (None, (1, 512, 4)),
    (132, None),
    (132, (4, 512, 8)),
    (44, None),
    (44, (4, 256, 8)),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    from reattention_kernels.triton_ops.topk import score_topk_fwd

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("REATTENTION_COMMIT", "unknown")}  # fmt: skip
    for tk in args.tokens:
        torch.manual_seed(0)
        q = torch.randn(1, 1, 9, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, tk, 3, 64, device="cuda", dtype=torch.bfloat16)
        shift = torch.zeros(1, dtype=torch.int64, device="cuda")
        want = score_topk_fwd(q, k, 4, length=tk, shift=shift)
        for splits, merge in VARIANTS:
            scoring = partial(score_topk_fwd, q, k, 4, length=tk, shift=shift, splits=splits, merge=merge)
            same = torch.equal(scoring(), want)
            graph = capture_graph(scoring)
            row = {"tokens": tk, "splits": splits, "merge": merge, "same_hits": same, **meta,
                   "ms": round(replay_ms(graph, 100), 4), "kernels": kernels(graph, 50)}  # fmt: skip
            emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
