"""Two-phase prefill scoring against one pass at large shapes: where they disagree, which is right?

    python3 benchmarks/probe_topk_rounding.py > benchmarks/results/topk-rounding-<gpu>-<commit>.jsonl

One pass scores with ``tl.dot`` (tensor-core accumulation); phase 2 of two phases rescores its
candidates with a plain fp32 sum. Both are exact top-k up to that accumulation order, so on
i.i.d. keys a few rows of ~65K may order two keys whose scores differ in the 7th digit
differently. For each block shape this prints the time (CUDA graph, L2 flushed), TFLOP/s
(``2 * TQ * HQ * TK * D``), the number of rows that differ from one pass, and for the first such
row both index lists with their fp64 scores, which tell which order is right.
"""

from __future__ import annotations

import json
from functools import partial

from bench_kernels import MODELS, Timer, ensure_importable

ensure_importable()  # reattention_kernels from a plain checkout

import torch

from reattention_kernels.triton_ops.topk import score_topk_fwd

timer = Timer(torch)
g = torch.Generator(device="cuda").manual_seed(0)
SHAPES = [("Llama-3.1-8B", 2048, 131072, 8), ("Llama-3.1-8B", 1024, 131072, 8), ("Llama-3.1-8B", 512, 131072, 8)]
SHAPES += [("SmolLM2-135M", 2048, 131072, 8), ("SmolLM2-135M", 256, 1048576, 4), ("SmolLM2-135M", 256, 262144, 4)]
# phase 1's (BM, BN, warps, stages); None: the default
CONFIGS = (("default", None), ("256x64x8", (256, 64, 8, 3)), ("256x64x8x4", (256, 64, 8, 4)))

for model, tq, tk, top_k in SHAPES:
    hq, h, d = MODELS[model]
    k = torch.randn(1, tk + 8, h, d, device="cuda", dtype=torch.bfloat16, generator=g)[:, 4 : 4 + tk]
    q = torch.randn(1, tq, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    one = score_topk_fwd(q, k, top_k, two_phase=False)
    row = {"model": model, "tq": tq, "tk": tk}
    for name, cfg in CONFIGS:
        two = score_topk_fwd(q, k, top_k, two_phase=True, config=cfg)
        bad = (two != one).any(-1)
        if bad.any():
            t, hh = bad[0].nonzero()[0].tolist()
            qq, kk = q[0, t, hh].double(), k[0, :, hh // (hq // h)].double()
            row[name + "_mismatch_rows"] = int(bad.sum())
            row[name + "_example"] = {
                "two": two[0, t, hh].tolist(),
                "one": one[0, t, hh].tolist(),
                "two_fp64": [round(x, 6) for x in (kk[two[0, t, hh]] @ qq).tolist()],
                "one_fp64": [round(x, 6) for x in (kk[one[0, t, hh]] @ qq).tolist()],
            }
        ms = timer.graph_ms(partial(score_topk_fwd, q, k, top_k, two_phase=True, config=cfg))
        row[name] = round(ms, 4)
        row[name + "_tflops"] = round(2 * tq * hq * tk * d / ms / 1e9, 1)
    print(json.dumps(row), flush=True)
