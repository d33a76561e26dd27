"""Time a decode step's selection paths on a CUDA GPU, kernel by kernel.

    python benchmarks/probe_decode_select.py [--tokens 131072 1048576] [--out FILE]

For the embedded preset's shapes (9 query / 3 KV heads, head dim 64, top-4, 32 blocks of 32) and
Llama-3.1-8B's (32 / 8, 128, top-8), one query token over a middle of ``--tokens`` keys: the
scoring alone, and scoring + selection by each path of `reattention_kernels.triton_ops.select`
(``fused``: split scan + `_merge_select`; ``small``: scan, merge, `_select_small`; ``tiles``: scan,
merge, histogram, tile reduction, blocks), each with 1, 2, 4 and 8 warps in its one-program
kernels (``SMALL_WARPS``). Each is timed as a CUDA-graph replay, as in the engine's decode step,
with and without the L2 flushed before it, and `torch.profiler` sums each kernel's device time.
Checks that all paths give the same outputs first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"SmolLM2-135M": (9, 3, 64, 4), "Llama-3.1-8B": (32, 8, 128, 8)}


@contextlib.contextmanager
def path(how: str, warps: int = 4):
    from reattention_kernels.triton_ops import select

    saved = select.FUSE_DECODE, select.SMALL_HITS, select.SMALL_WARPS
    select.FUSE_DECODE, select.SMALL_WARPS = how == "fused", warps
    if how == "tiles":
        select.SMALL_HITS = 0
    try:
        yield
    finally:
        select.FUSE_DECODE, select.SMALL_HITS, select.SMALL_WARPS = saved


def graph_of(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def replay_ms(g, reps: int = 50, flush: torch.Tensor | None = None) -> float:
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def kernels(g, reps: int = 20) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.count:
            out[ev.key[:60]] = round(t / reps / 1000, 4)  # ms per replay
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    from reattention_kernels import score_select
    from reattention_kernels.triton_ops.topk import score_topk_fwd

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for model, (hq, h, d, top_k) in SHAPES.items():
        for tk in args.tokens:
            torch.manual_seed(0)
            q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, tk, h, d, device="cuda", dtype=torch.bfloat16)
            shift = torch.zeros(1, dtype=torch.int64, device="cuda")
            call = partial(score_select, q, k, top_k, 32, 32, 32, length=tk, shift=shift, backend="triton")
            outs = {}
            for how in ("fused", "small", "tiles"):
                with path(how):
                    outs[how] = call()
            same = all(torch.equal(outs[h_][0], outs["fused"][0]) for h_ in outs)
            row = {"model": model, "tokens": tk, "same_outputs": same, **meta}
            g = graph_of(partial(score_topk_fwd, q, k, top_k, length=tk, shift=shift))
            row["scoring_ms"] = round(replay_ms(g), 4)
            for how in ("fused", "small", "tiles"):
                for warps in (1, 2, 4, 8):
                    with path(how, warps):
                        g = graph_of(call)
                    name = f"{how}_w{warps}"
                    row[f"{name}_ms"] = round(replay_ms(g), 4)
                    row[f"{name}_ms_l2_flushed"] = round(replay_ms(g, flush=flush), 4)
                    row[f"{name}_kernels"] = kernels(g)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
