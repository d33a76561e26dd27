"""A decode step's scoring at long contexts: one pass (the default) against two phases with decode-sized tiles.

    python3 benchmarks/probe_decode_phases.py [--out results.jsonl]

One pass admits candidates with data-dependent branches in the tile loop; two phases keep only each
row's best tile maxima there (no branch) and rescore those tiles in a second kernel that also merges
the key splits (one pass needs a merge kernel too). Embedded-model shapes (9 query / 3 KV heads, D 64),
one query token, top-4, i.i.d. keys; CUDA-graph replays with the L2 flushed; every variant checked equal
to one pass (up to fp32 rounding ties, as `bench_topk_phases.same_up_to_rounding`).
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

from reattention_kernels.triton_ops.topk import score_topk_fwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    timer = Timer(torch)
    gen = torch.Generator(device="cuda").manual_seed(0)
    variants = {"one-pass": {}}
    for bm, bn, warps, stages in ((16, 128, 4, 3), (16, 64, 4, 3), (16, 256, 4, 3), (16, 128, 8, 3)):
        for splits in (None, 132, 264):
            name = f"two-{bm}x{bn}x{warps}w{stages}s" + ("" if splits is None else f"-{splits}splits")
            variants[name] = {"two_phase": True, "config": (bm, bn, warps, stages), "splits": splits}
    for tk in (131072, 1048576):
        q = torch.randn(1, 1, 9, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, tk, 3, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = score_topk_fwd(q, k, 4)
        row = {"tk": tk}
        for name, kw in variants.items():
            out = score_topk_fwd(q, k, 4, **kw)
            if not torch.equal(out, ref):
                row[name] = f"differs in {int((out != ref).any(-1).sum())} rows"
                continue
            row[name] = round(timer.graph_ms(partial(score_topk_fwd, q, k, 4, **kw)), 4)
        row["key_bytes_ms_at_3000gbps"] = round(k.numel() * 2 / 3000e9 * 1e3, 4)
        row.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version(), commit=git_rev())  # fmt: skip
        emit(row, None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
