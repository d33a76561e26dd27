"""A decode step's scoring scan: tile shapes, pipeline stages and split counts, at 128K and 1M keys.

    python3 benchmarks/probe_decode_tiles.py [--out results.jsonl]

One query token, i.i.d. bf16 keys, the embedded model's shapes (9 query / 3 KV heads, D 64, top-4) and
Llama-3.1-8B's (32 / 8, D 128, top-8). Each variant forces `score_topk_fwd`'s one-pass ``config`` (BM,
BN, num_warps, num_stages) and ``splits``, is checked equal to the default's hits, and is timed as a
CUDA-graph replay with the L2 flushed. GB/s counts the key bytes read once, against a device-to-device
copy (read + write) timed in the same run.

Why: on an H200 the default then (16 x 128 tiles at every head dim) reached 72% of the copy rate for
the embedded model at 1M keys and 99% for Llama-8B's shapes; a tile of 128 keys at D 64 is half the
bytes of one at D 128, so fewer bytes are in flight per program while each tile costs about the same.
"""

from __future__ import annotations

import argparse
import platform
from functools import partial
from pathlib import Path

from bench_kernels import Timer, ensure_importable, git_rev

ensure_importable()  # before anything imports reattention_kernels

import torch
import triton
from probe_decode_select import emit

from reattention_kernels.triton_ops.topk import _config, _key_splits, score_topk_fwd

SHAPES = {"smollm2": (9, 3, 64, 4), "llama8b": (32, 8, 128, 8)}
CONFIGS = (
    (16, 128, 4, 3),
    (16, 128, 4, 4),
    (16, 128, 8, 3),
    (16, 256, 4, 3),
    (16, 256, 8, 3),
    (16, 256, 4, 2),
    (16, 256, 8, 4),
    (16, 64, 4, 4),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    args = ap.parse_args()
    out = None if args.out is None else Path(args.out)
    timer = Timer(torch)
    copy_gbs = timer.copy_gbs()  # as bench_kernels.py measures it
    gen = torch.Generator(device="cuda").manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "commit": git_rev(), "copy_gbps": round(copy_gbs, 1)}  # fmt: skip
    for model, (hq, h, d, top_k) in SHAPES.items():
        for tk in args.tokens:
            q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, tk, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = score_topk_fwd(q, k, top_k)
            default_splits = _key_splits(tk, h, q.device)[0]
            default_config = _config(hq // h, q.dtype, d)
            for config in CONFIGS:
                for splits in sorted({default_splits, min(2 * default_splits, 256), 256}):
                    kw = {"config": config, "splits": splits, "two_phase": False}
                    row = {"model": model, "tk": tk, "config": list(config), "splits": splits,
                           "default": config == default_config and splits == default_splits}  # fmt: skip
                    got = score_topk_fwd(q, k, top_k, **kw)
                    if not torch.equal(got, ref):
                        emit({**row, "error": f"differs in {int((got != ref).any(-1).sum())} rows", **meta}, out)
                        continue
                    ms = timer.graph_ms(partial(score_topk_fwd, q, k, top_k, **kw))
                    gbs = k.numel() * k.element_size() / ms / 1e6
                    emit({**row, "graph_ms": round(ms, 4), "GBps": round(gbs, 1),
                          "pct_copy": round(100 * gbs / copy_gbs, 1), **meta}, out)  # fmt: skip
            del q, k


if __name__ == "__main__":
    main()
