"""Where the time of a disk-cache restore goes: reading, checksums, host-to-device copies.

Writes ``--pages`` synthetic pages (random keys and values shaped like the embedded model's:
30 layers, 3 KV heads, head dim 64, bf16, 1024 tokens a page; 1024 pages = 1M tokens = 24 GB)
with the real `DiskCache.save`, then times, each on all pages:

  read         16 threads ``readinto`` pinned buffers, nothing else (the page-cache read floor)
  read+crc     the same plus the CRC-32 of every byte (zlib, on the reading threads)
  load         `DiskCache.load(pin=True)`: read, header checks and CRCs, pages yielded in order
  restore      load + `KVStore.extend` of every layer into a CUDA store (what a warm start does),
               with the main thread's time split into waiting for pages and launching copies
  restore-page the same with one host-to-device copy per page, then device-side copies per layer
  restore-foreach  one host-to-device copy per page, then one `torch._foreach_copy_` into 2L buffers
  crc1         one thread's CRC-32 throughput (one page, ten times, scaled to all pages)
  restore-cold the same after ``posix_fadvise(DONTNEED)`` dropped the files from the page cache

    python3 benchmarks/profile_restore.py --pages 1024 --dir /root/prof --out $OUT/restore.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from reattention_core.disk_cache import DiskCache, PageRef, _read_page_pinned, page_file_name
from reattention_core.fingerprint import FORMAT_VERSION, EngineFingerprint
from reattention_core.store import KVStore


def _refs(cache: DiskCache, fp: EngineFingerprint, n: int, page_size: int) -> list[PageRef]:
    ns = cache.namespace_dir(fp)
    keys = [f"{i:064x}" for i in range(1, n + 1)]
    parents = [fp.root] + keys[:-1]
    return [PageRef(ns / page_file_name(i, k), k, p, i, page_size) for i, (k, p) in enumerate(zip(keys, parents))]


def _write(cache, fp, refs, layers, heads, dim, dtype) -> float:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(refs[0].tokens, heads, dim, generator=g).to(dtype)
    t0 = time.perf_counter()
    for i, ref in enumerate(refs):
        keys = [base + (i + j) for j in range(layers)]  # distinct bytes per page and layer
        values = [base - (i + j) for j in range(layers)]
        assert cache.save(fp, ref, keys, values) == "written"
    return time.perf_counter() - t0


def _files(refs) -> list[str]:
    return [str(r.path) for r in refs]


def _raw_read(paths, workers, crc) -> float:
    def one(path):
        got = _read_page_pinned(path)
        assert got is not None
        if crc:
            zlib.crc32(got[1].numpy())
        return got[1].numel()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(one, paths))
    dt = time.perf_counter() - t0
    return dt, total


def _restore(cache, fp, refs, layers, dtype, device, whole_page=False, foreach=False) -> dict:
    store = KVStore(layers)
    staging = None
    bufs: list[torch.Tensor] = []  # foreach: 2L plain [total, H, D] buffers standing in for the store
    start = 0
    store.reserve(sum(r.tokens for r in refs))
    torch.cuda.synchronize()
    wait = launch = 0.0
    t0 = time.perf_counter()
    pages = cache.load(fp, refs, num_layers=layers, dtype=dtype, pin=True)
    n = 0
    while True:
        a = time.perf_counter()
        page = next(pages, None)
        b = time.perf_counter()
        wait += b - a
        if page is None:
            break
        keys, values = page
        if foreach:  # one host-to-device copy of the page, then one multi-tensor device copy
            both = torch.empty(0, dtype=keys[0].dtype).set_(keys[0].untyped_storage())
            both = both[: 2 * layers * keys[0].numel()].view(2 * layers, *keys[0].shape)
            if staging is None:
                staging = torch.empty_like(both, device=device)
                total = sum(r.tokens for r in refs)
                bufs = [torch.empty((total, *keys[0].shape[1:]), dtype=dtype, device=device) for _ in range(2 * layers)]
            staging.copy_(both, non_blocking=True)
            end = start + keys[0].shape[0]
            torch._foreach_copy_([buf[start:end] for buf in bufs], list(staging.unbind(0)))
            start = end
            launch += time.perf_counter() - b
            n += 1
            continue
        if whole_page:  # one host-to-device copy of the page, then device-to-device copies per layer
            st = keys[0].untyped_storage()
            nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
            host = torch.empty(0, dtype=torch.uint8).set_(st)[:nbytes]
            if staging is None:
                staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
            staging.copy_(host, non_blocking=True)

            def on_gpu(t):
                off = t.data_ptr() - st.data_ptr()
                return staging[off : off + t.numel() * t.element_size()].view(dtype).view(t.shape)

            keys, values = [on_gpu(t) for t in keys], [on_gpu(t) for t in values]
        for layer in range(layers):
            store.extend(layer, keys[layer].unsqueeze(0), values[layer].unsqueeze(0), device=device, dtype=dtype)
        launch += time.perf_counter() - b
        n += 1
    a = time.perf_counter()
    torch.cuda.synchronize()
    sync = time.perf_counter() - a
    total = time.perf_counter() - t0
    assert n == len(refs), (n, len(refs))
    del store
    torch.cuda.empty_cache()
    return {"s": total, "wait_s": wait, "launch_s": launch, "sync_s": sync}


def _drop(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--dir", default="/tmp/profile-restore")
    ap.add_argument("--out", default=None)
    ap.add_argument("--phases", nargs="+", default=["crc1", "read", "read+crc", "load", "restore", "restore", "restore-page", "restore-cold"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_restore.py needs a CUDA device")
    dtype, device = torch.bfloat16, torch.device("cuda")
    shutil.rmtree(args.dir, ignore_errors=True)
    cache = DiskCache(args.dir, 1 << 50, workers=args.workers)
    fp = EngineFingerprint({"format": str(FORMAT_VERSION), "model": "synthetic"})
    refs = _refs(cache, fp, args.pages, args.page_size)
    row = {
        "bench": "profile_restore",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("REATTENTION_COMMIT", "unknown"),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "pages": args.pages,
        "page_size": args.page_size,
        "shape": [args.layers, args.heads, args.head_dim],
    }
    row["write_s"] = _write(cache, fp, refs, args.layers, args.heads, args.head_dim, dtype)
    paths = _files(refs)
    row["bytes"] = sum(os.path.getsize(p) for p in paths)
    print(json.dumps(row), flush=True)
    gb = row["bytes"] / 1e9
    for phase in args.phases:
        if phase in ("read", "read+crc"):
            dt, _ = _raw_read(paths, args.workers, crc=phase == "read+crc")
            result = {"s": dt}
        elif phase == "load":
            t0 = time.perf_counter()
            n = sum(1 for _ in cache.load(fp, refs, num_layers=args.layers, dtype=dtype, pin=True))
            assert n == len(refs)
            result = {"s": time.perf_counter() - t0}
        elif phase == "crc1":  # one thread's CRC-32 throughput over one page, ten times
            got = _read_page_pinned(paths[0])
            t0 = time.perf_counter()
            for _ in range(10):
                zlib.crc32(got[1].numpy())
            result = {"s": (time.perf_counter() - t0) * len(paths) / 10}  # scaled to all pages
        elif phase in ("restore", "restore-cold", "restore-page", "restore-foreach"):
            if phase == "restore-cold":
                _drop(paths)
            result = _restore(
                cache, fp, refs, args.layers, dtype, device,
                whole_page=phase == "restore-page", foreach=phase == "restore-foreach",
            )  # fmt: skip
        else:
            raise SystemExit(f"unknown phase {phase}")
        result = {"phase": phase, **{k: round(v, 3) for k, v in result.items()}, "GB_per_s": round(gb / result["s"], 2)}
        row.setdefault("phases", []).append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
