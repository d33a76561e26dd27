"""Host time of one decode step's kernel calls, and where it goes (cProfile).

The end-to-end tables show decode and prefill bound by host time (about 2.4 ms per layer step
against well under 1 ms of GPU time). This times, on SmolLM2-135M shapes at 128K keys with one
query, the eager host cost of `score_topk`, `scope_attention` and `select_blocks`, the floor of a
Triton launch with as many arguments (an empty kernel), and prints the top functions of a cProfile
of each, so that the fix (CUDA graphs, fewer launches, leaner wrappers) goes where the time is.

    python3 benchmarks/profile_host.py --out $OUT/host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import triton
import triton.language as tl

from reattention_core.selection import select_blocks
from reattention_kernels import scope_attention, score_topk


@triton.jit
def _empty(
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9,
    i10, i11, i12, i13, i14, i15, i16, i17, i18, i19, i20, f0, X: tl.constexpr, Y: tl.constexpr,
):  # fmt: skip
    pass


def _host_us(fn, n: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def _profile(fn, n: int, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=131072)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, h, d, t, tq = 9, 3, 64, args.keys, args.queries
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, tq, hq, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, t, h, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, t, h, d, device=dev, dtype=dt, generator=g)
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    sink, local = 32, 256
    middle = k[:, sink : t - local]
    sel, n_sel = select_blocks(q, middle, top_k=4, max_blocks=32, block_size=32)
    sel = sel + sink
    a = torch.empty(16, device=dev)

    calls = {
        "score_topk": lambda: score_topk(q, middle, 4),
        "select_blocks (score_topk + votes + blocks)": lambda: select_blocks(
            q, middle, top_k=4, max_blocks=32, block_size=32
        ),
        "select_blocks, fused selection kernel (backend=triton)": lambda: select_blocks(
            q, middle, top_k=4, max_blocks=32, block_size=32, backend="triton"
        ),
        "scope_attention": lambda: scope_attention(
            q, k, v, sel, n_sel, sink_len=sink, local_start=t - local, inv_freq=inv_freq,
            attention_scaling=1.0, scale=d**-0.5,
        ),  # fmt: skip
        "empty Triton kernel, 33 arguments": lambda: _empty[(1,)](
            *([a] * 11), *range(7, 28), 0.5, X=1, Y=2
        ),
        "torch.empty": lambda: torch.empty(64, device=dev),
        "torch add (one launch)": lambda: a.add_(1),
    }
    row = {
        "bench": "profile_host",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": os.environ.get("REATTENTION_COMMIT", "unknown"),
        "shape": {"TQ": tq, "HQ": hq, "H": h, "D": d, "T": t},
        "host_us": {},
    }
    for name, fn in calls.items():
        row["host_us"][name] = round(_host_us(fn, args.calls), 1)
        print(f"{name}: {row['host_us'][name]} us", flush=True)
    for name in ("select_blocks (score_topk + votes + blocks)", "select_blocks, fused selection kernel (backend=triton)", "scope_attention"):
        text = _profile(calls[name], 200, args.top)
        row.setdefault("profiles", {})[name] = text
        print(f"\n=== {name} (200 calls) ===\n{text}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(row, fh, indent=1)


if __name__ == "__main__":
    main()
