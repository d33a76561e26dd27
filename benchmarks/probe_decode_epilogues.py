"""Time a decode step's split kernels with their epilogues in the last program against separate launches.

    python benchmarks/probe_decode_epilogues.py [--tokens 131072 1048576] [--models ...] [--out FILE]

A decode step splits two kernels over many programs, each combining its partial results in a second
launch: the scoring scan (top-k per split, then a split merge and the one-program selection) and the
scope attention (partial outputs per scope split, then an LSE merge). With the epilogues on
(``topk.FUSE_DECODE_SELECTION``, ``attention.FUSE_DECODE_MERGE``) the last program of each group to
finish does that work itself (`reattention_kernels.triton_ops.arrivals`). For the embedded preset's
shapes (9 query / 3 KV heads, head dim 64, top-4, 32 blocks of 32, sink 64 + local 256) and
Llama-3.1-8B's (32 / 8, 128, top-8, 127 blocks of 32, sink 32 + local 4096), one query token over a
store of ``--tokens`` bf16 keys and values, this times as CUDA-graph replays (as the engine runs a
decode step), L2 warm and flushed:

* ``select``: `score_select` (scoring and selection),
* ``attention``: `scope_attention` over the selected scope,
* ``layer``: both, one after the other (a layer step's selection and attention),

each with the epilogues ``on`` and ``off``, and sums each kernel's device time per replay. Outputs are
checked first: the selections equal, the attention outputs within fp32 rounding of each other.
``fused_taken`` says whether the shape fits the selection epilogue (the one-program selection takes
at most ``select.SMALL_HITS`` hits: Llama-8B's 256 do not). One JSON line per shape.

``--check`` only runs the output checks, also on a CPU under ``TRITON_INTERPRET=1`` (use small
``--tokens``, e.g. 6000): a dry run of this script without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import epilogues
from bench_kernels import capture_graph
from probe_decode_select import emit, time_graph

# (HQ, H, D, top_k, max_blocks, block, sink, local)
SHAPES = {"SmolLM2-135M": (9, 3, 64, 4, 32, 32, 64, 256), "Llama-3.1-8B": (32, 8, 128, 8, 127, 32, 32, 4096)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="outputs only, no timing (CPU: with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (args.check and os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("needs a CUDA GPU (or --check with TRITON_INTERPRET=1)")
    import triton

    from reattention_kernels import scope_attention, score_select
    from reattention_kernels.triton_ops import topk

    flush = None if args.check else torch.empty(256 << 20, dtype=torch.int8, device=device)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("REATTENTION_COMMIT", "unknown")}  # fmt: skip
    for model in args.models:
        hq, h, d, top_k, max_blocks, block, sink, local = SHAPES[model]
        for tokens in args.tokens:
            torch.manual_seed(0)
            q = torch.randn(1, 1, hq, d, device=device, dtype=torch.bfloat16)
            k = torch.randn(1, tokens, h, d, device=device, dtype=torch.bfloat16)
            v = torch.randn(1, tokens, h, d, device=device, dtype=torch.bfloat16)
            shift = torch.zeros(1, dtype=torch.int64, device=device)
            middle = tokens - sink - local
            inv_freq = 1.0 / (100000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
            select = partial(score_select, q, k[:, sink:], top_k, max_blocks, block, sink, length=middle,
                             shift=shift, backend="triton")  # fmt: skip
            sel, n_sel = select()

            attend = partial(scope_attention, q, k, v, sel, n_sel, sink_len=sink, local_start=tokens - local,
                             inv_freq=inv_freq, attention_scaling=1.0, scale=d**-0.5, length=tokens, shift=shift,
                             backend="triton")  # fmt: skip

            def layer(select=select, attend=attend):
                select()
                return attend()

            taken, real = [], topk._fused_selection

            def watched(*a, real=real, taken=taken):
                got = real(*a)
                taken.append(got is not None)
                return got

            outs = {}
            topk._fused_selection = watched
            try:
                for on in (True, False):
                    with epilogues("on" if on else "off"):
                        outs[on] = (select(), attend())
            finally:
                topk._fused_selection = real
            row = {"model": model, "tokens": tokens, "hits": hq * top_k, **meta}
            row["fused_taken"] = bool(taken) and taken[0]  # never asked: an unsplit scan (few keys)
            (s_on, a_on), (s_off, a_off) = outs[True], outs[False]
            row["same_selection"] = all(torch.equal(x, y) for x, y in zip(s_on, s_off))
            row["attention_max_diff"] = float((a_on[0].float() - a_off[0].float()).abs().max())
            if args.check:
                emit(row, args.out)
                continue
            for part, fn in (("select", select), ("attention", attend), ("layer", layer)):
                for on in (True, False):
                    with epilogues("on" if on else "off"):
                        g = capture_graph(fn)
                    time_graph(row, f"{part}_{'on' if on else 'off'}", g, flush)
            emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
