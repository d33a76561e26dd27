"""Is reading HBM faster than copying it? (a check of the decode goal's key-read floor)

    python3 benchmarks/probe_read_bandwidth.py [--out FILE.jsonl]

`bench_engine.key_read_floor` divides the middle keys' bytes by the rate of a device-to-device copy
(bytes read + written, `bench_engine.hbm_copy_bandwidth`). A read-only pass could be faster, which
would make that floor lenient. This times that copy, then, best of 10 over 2 GiB of bf16,
``torch.sum`` and ``torch.amax`` (bytes read) and a Triton streaming reader at a few block shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import best_gpu_s, hbm_copy_bandwidth
from bench_kernels import git_rev


@triton.jit
def _read(x, out, N, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        o = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x + o, mask=o < N, other=0.0).to(tl.float32)
    tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    copy_gbps = hbm_copy_bandwidth()  # before the reads' buffer: the floor's own measurement, as it runs there
    src = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    nbytes = src.numel() * src.element_size()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_rev()}  # fmt: skip
    rows = [
        {"what": "copy (read + write)", "GBps": copy_gbps},
        {"what": "torch.sum (read)", "GBps": nbytes / best_gpu_s(lambda: src.sum(dtype=torch.float32)) / 1e9},
        {"what": "torch.amax (read)", "GBps": nbytes / best_gpu_s(src.amax) / 1e9},
    ]
    for block, iters, warps in ((4096, 16, 4), (8192, 8, 8), (2048, 64, 4), (4096, 64, 8)):
        grid = (triton.cdiv(src.numel(), block * iters),)
        out = torch.empty(grid[0] * block, device="cuda")

        def read(grid=grid, out=out, block=block, iters=iters, warps=warps):
            _read[grid](src, out, src.numel(), BLOCK=block, ITERS=iters, num_warps=warps)

        rows.append({"what": f"triton read {block}x{iters}, {warps} warps", "GBps": nbytes / best_gpu_s(read) / 1e9})
    for row in rows:
        row = {**meta, **row, "GBps": round(row["GBps"], 1)}
        print(json.dumps(row))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
