"""Time a decode step's block selection on a CUDA GPU, kernel by kernel.

    python benchmarks/probe_decode_select.py [--tokens 131072 1048576] [--warps 4 8] [--out FILE]

For the embedded preset's shapes (9 query / 3 KV heads, head dim 64, top-4, 32 blocks of 32) and
Llama-3.1-8B's (32 / 8, 128, top-8), one query token over a middle of ``--tokens`` keys: the
scoring alone (`score_topk`), then scoring + `select_from_hits` by each path of
`reattention_kernels.triton_ops.select`: ``default`` (`_select_small` for up to ``SMALL_HITS``
hits) and ``histogram`` (histogram, tile reduction, blocks), with each of ``--warps`` in the
one-program kernels. Every case is a CUDA-graph replay, as in the engine's decode step, timed with
and without the L2 flushed; `torch.profiler` sums each kernel's device time per replay. The paths'
outputs are checked equal first. One JSON line per shape (appended to ``--out`` as it goes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import selecting
from bench_kernels import capture_graph, replay_ms
from profile_step import cuda_kernel_times

SHAPES = {"SmolLM2-135M": (9, 3, 64, 4), "Llama-3.1-8B": (32, 8, 128, 8)}


@contextlib.contextmanager
def path(how: str, warps: int):
    """`bench_engine.selecting`, with ``warps`` in the one-program kernels."""
    from reattention_kernels.triton_ops import select

    saved = select.SMALL_WARPS, select.BLOCKS_WARPS
    select.SMALL_WARPS = select.BLOCKS_WARPS = warps
    try:
        with selecting(how):
            yield
    finally:
        select.SMALL_WARPS, select.BLOCKS_WARPS = saved


def kernels(graph, reps: int = 20) -> dict[str, float]:
    """Device ms per replay of each kernel, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    times, _ = cuda_kernel_times(trace, name=lambda raw: raw[:60])
    return {k: round(us / reps / 1000, 4) for k, us in sorted(times.items(), key=lambda kv: -kv[1])}


def time_graph(row: dict, name: str, graph, flush) -> None:
    """``row[name + "_ms"]`` and ``..._ms_l2_flushed``: median replay ms of ``graph``, L2 warm and
    flushed; ``..._kernels``: its kernels' device ms per replay."""
    row[f"{name}_ms"] = round(replay_ms(graph, 50), 4)
    row[f"{name}_ms_l2_flushed"] = round(replay_ms(graph, 50, flush), 4)
    row[f"{name}_kernels"] = kernels(graph)


def emit(row: dict, out: Path | None) -> None:
    """Print ``row`` as a JSON line and append it to ``out`` (if given) as it goes."""
    print(json.dumps(row), flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    from reattention_kernels import score_topk, select_from_hits

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("REATTENTION_COMMIT", "unknown")}  # fmt: skip
    for model in args.models:
        hq, h, d, top_k = SHAPES[model]
        for tk in args.tokens:
            torch.manual_seed(0)
            q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, tk, h, d, device="cuda", dtype=torch.bfloat16)
            shift = torch.zeros(1, dtype=torch.int64, device="cuda")
            scoring = partial(score_topk, q, k, top_k, length=tk, shift=shift, backend="triton")

            def step(scoring=scoring, tk=tk, shift=shift):
                hits = scoring().reshape(1, -1)
                return select_from_hits(hits, tk, 32, 32, 32, shift=shift, max_middle_len=tk, backend="triton")

            outs = []
            for how in ("default", "histogram"):
                with path(how, 4):
                    outs.append(step())
            row = {"model": model, "tokens": tk, "hits": hq * top_k, **meta}
            row["same_outputs"] = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
            row["scoring_ms"] = round(replay_ms(capture_graph(scoring), 50), 4)
            for how in ("default", "histogram"):
                for warps in args.warps:
                    with path(how, warps):
                        g = capture_graph(step)
                    time_graph(row, f"{how}_w{warps}", g, flush)
            emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
