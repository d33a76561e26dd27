"""Two-phase prefill scoring against one pass, by key-range length, block configuration and phase-2 row block.

    python3 benchmarks/bench_topk_phases.py > benchmarks/results/topk-phases-<gpu>-<commit>.jsonl

One JSON line per (shape, data): ``one`` is the one-pass kernel's CUDA-graph time in ms (L2 flushed),
``two-<BM>x<warps>-sb<SB>`` the two-phase kernel's with BM rows per program and SB rows per phase-2
block. ``randn`` keys are i.i.d. (the worst case for phase 2: every row favours different tiles);
``heavy`` scales every 4096th key by 4 (a few keys that many rows share, as real attention has).
The first ``two-*-sb16`` of each randn shape is checked equal to the one-pass result first.
This chose ``_TWO_PHASE_MIN_KEYS`` and ``_SUB_ROWS`` in ``kernels/triton_ops/topk.py``.
"""
import json, sys
from functools import partial
import torch
sys.path.insert(0, "benchmarks")
from bench_kernels import Timer, MODELS  # noqa: E402
from reattention_kernels.triton_ops.topk import score_topk_fwd  # noqa: E402

timer = Timer(torch)
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
def randn(*s): return torch.randn(*s, device=dev, dtype=torch.bfloat16, generator=g)
shapes = [("SmolLM2-135M", 256, tk, 4) for tk in (16384, 32768, 65536, 131072, 262144, 524288, 1048576)]
shapes += [("SmolLM2-135M", 2048, 131072, 8), ("Llama-3.1-8B", 2048, 131072, 8), ("Llama-3.1-8B", 512, 32768, 8)]
for model, tq, tk, topk in shapes:
    hq, h, d = MODELS[model]
    k = randn(1, tk + 260, h, d)[:, 4:4 + tk]; q = randn(1, tq, hq, d)
    ks = k.clone(); ks[:, ::4096] *= 4
    ref = score_topk_fwd(q, k, topk, two_phase=False)
    for data, kk in (("randn", k), ("heavy", ks)):
        row = dict(model=model, tq=tq, tk=tk, data=data, one=round(timer.graph_ms(partial(score_topk_fwd, q, kk, topk, two_phase=False)), 4))
        for cfg in (None, (128, 128, 8, 3), (128, 128, 4, 3)):
            for sb in (16, 32, 64):
                key = f"two-{cfg[0] if cfg else 64}x{cfg[2] if cfg else 4}-sb{sb}"
                try:
                    if data == "randn" and sb == 16:
                        assert (score_topk_fwd(q, kk, topk, two_phase=True, config=cfg, sub_rows=sb) == ref).all(), "MISMATCH"
                    row[key] = round(timer.graph_ms(partial(score_topk_fwd, q, kk, topk, two_phase=True, config=cfg, sub_rows=sb)), 4)
                except Exception as e:  # noqa
                    row[key] = str(e)[:80]
        print(json.dumps(row), flush=True)
    del k, ks, q
