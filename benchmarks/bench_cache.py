"""Time to first token for a question over a corpus: cold vs warm-in-memory vs warm-from-disk.

For each corpus size N (tokens of Python standard-library documentation, rendered by pydoc and
cut to N tokens), with the corpus passed as ``context=`` and a short question:

  cold        a fresh cache directory: the whole prompt is prefilled (and its pages written to disk)
  memory      the same engine asks again: the corpus comes from the in-memory prefix cache
  disk        a fresh process (a subprocess: loads the model, runs `ReAttentionEngine.warmup`,
              then asks): the corpus comes from disk, with the OS page cache still holding the files
  disk-cold   the same after the page-cache copies of the files were dropped (posix_fadvise
              DONTNEED), so the pages are read from the device

TTFT is the wall time of ``generate(question, context=corpus, max_new_tokens=1)`` (prefill, cache
restore and sampling the first token); the fresh process's model loading and warm-up
(`ReAttentionEngine.warmup`: one-time CUDA/Triton start-up costs) are reported apart (``load_s``,
``warmup_s``). Every row records device, versions, commit, the tokens restored from the cache and
the tokens still prefilled (the tail after the last full page before the final token), and
whether the first token equals the cold run's.

    python benchmarks/bench_cache.py --tokens 32768 --out benchmarks/results/cache-cpu.jsonl
    # GPU machine (eval "$(bash benchmarks/goals.sh env)" first):
    python3 benchmarks/bench_cache.py --model /root/model --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tokens 131072 1048576 --out $OUT/cache.jsonl

``--offload host`` (with ``--offload-budget B``: the approximate store) or ``--offload values`` runs every
phase with that offloaded store; ``--map-pages on off`` then runs each disk phase once per setting of
`OffloadConfig.map_pages` (a host store restored from disk keeps the page files mapped, or copies
them into host buffers). The fresh process also reports its host memory after the question
(``rss_anon_gib``: the process's own memory, pinned buffers included; ``rss_file_gib``: mapped file
pages, which the OS may drop and read again), the store's host buffers and mapped tokens, and with
``--decode N`` the decode ms/token of an N-token answer over the restored store::

    python3 benchmarks/bench_cache.py $M --tokens 131072 --offload host --offload-budget 64 \
        --map-pages on off --phases cold disk --decode 16 --out $OUT/cache-mapped.jsonl

``--phases`` runs a subset; speedups then use the latest cold row of the output file for the same
model, device and size. At 1M tokens the phases do not fit one 10-minute command on the H100
(cold prefill about 6 minutes, each fresh process about a minute to load the GGUF): split them,
back to back, sharing the folders and the output file::

    D=/tmp/bench-cache; M="--model /root/SmolLM2-135M-Instruct --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 benchmarks/bench_cache.py $M --tokens 1048576 --phases cold memory \
        --cache-dir $D --work-dir $D --out $D/cache.jsonl
    python3 benchmarks/bench_cache.py $M --tokens 1048576 --phases disk disk-cold \
        --cache-dir $D --work-dir $D --out $D/cache.jsonl && cp $D/cache.jsonl $OUT/

``--restore-profile PAGES`` (GPU) instead profiles a restore from disk, no model loaded: ``PAGES``
synthetic pages shaped like the embedded model's (``--layers/--heads/--head-dim``, bf16, 1024 tokens a
page; 1024 pages = 1M tokens = 24 GB) written with `DiskCache.save`, then, each over all pages, timed:
``read`` (threads reading the files into pinned buffers: the page-cache read floor), ``read+crc`` (the
same plus a CRC-32 of every byte), ``load`` (`DiskCache.load(pin=True)`: reads, header checks, CRCs),
``restore`` (load + `ResidentStore.extend` of every layer into a CUDA store, the main thread's time split
into waiting for pages and launching copies) and ``restore-cold`` (after ``posix_fadvise(DONTNEED)``)::

    python3 benchmarks/bench_cache.py --restore-profile 1024 --cache-dir /root/prof --out $OUT/restore.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import pydoc
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from reattention_core import CacheConfig, OffloadConfig, ReAttentionConfig, ReAttentionEngine
from reattention_core.embedded import preset_for

PHASES = ("cold", "memory", "disk", "disk-cold")
QUESTION = "Which function in the documentation above returns the greatest common divisor of integers?"
# Standard-library modules whose pydoc text makes the corpus (cycled when more text is needed).
MODULES = (
    "math",
    "collections",
    "functools",
    "itertools",
    "os",
    "pathlib",
    "re",
    "json",
    "typing",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "string",
    "textwrap",
    "shutil",
    "tarfile",
    "zipfile",
    "sqlite3",
    "socket",
    "csv",
    "configparser",
    "dataclasses",
    "enum",
    "heapq",
    "bisect",
    "contextlib",
    "abc",
    "io",
    "pickle",
    "copy",
    "pprint",
    "difflib",
    "calendar",
    "glob",
    "tempfile",
    "hashlib",
    "base64",
    "struct",
    "codecs",
    "inspect",
    "unittest",
    "doctest",
    "asyncio",
    "http.client",
    "urllib.request",
    "email.message",
    "xml.etree.ElementTree",
    "concurrent.futures",
    "queue",
    "sched",
    "selectors",
    "signal",
    "ssl",
    "uuid",
    "zlib",
    "gzip",
    "bz2",
    "lzma",
    "operator",
    "weakref",
    "types",
    "ast",
    "dis",
    "tokenize",
    "traceback",
    "warnings",
    "timeit",
)


def corpus_text(tokenizer, tokens: int) -> str:
    """Exactly ``tokens`` tokens (as encoded alone) of pydoc text, decoded back to a string."""
    import importlib

    parts: list[str] = []
    ids: list[int] = []
    rounds = 0
    while len(ids) < tokens:
        for name in MODULES:
            try:
                module = importlib.import_module(name)
                doc = pydoc.render_doc(module, renderer=pydoc.plaintext)
            except Exception:  # noqa: BLE001, S112 - a module missing on this Python is skipped
                continue
            parts.append(f"\n\n=== {name} (part {rounds + 1}) ===\n\n{doc}")
            ids.extend(tokenizer(parts[-1], add_special_tokens=False)["input_ids"])
            if len(ids) >= tokens:
                break
        rounds += 1
    return tokenizer.decode(ids[:tokens])


def environment() -> dict:
    # $REATTENTION_COMMIT first: an exported copy (the GPU machine) may sit inside an unrelated checkout
    commit = (
        os.environ.get("REATTENTION_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def offload_config(kind: str, budget: int | None, map_pages: bool = True) -> OffloadConfig | None:
    """The store of ``--offload``: ``none`` (resident), ``values`` or ``host`` (budgeted if ``budget``)."""
    if kind == "none":
        return None
    if kind == "values":
        return OffloadConfig(keys="device")
    if budget:
        return OffloadConfig(block=64, budget=budget, refine=False, map_pages=map_pages)
    return OffloadConfig(map_pages=map_pages)


def load_engine(
    model: str, gguf_file: str | None, cache: CacheConfig, offload: OffloadConfig | None = None
) -> ReAttentionEngine:
    if model == "embedded":
        return ReAttentionEngine.from_pretrained(cache=cache, offload=offload)
    # A local copy of the embedded model gets its measured preset, as the embedded model does.
    preset = preset_for(f"{model} {gguf_file or ''}")
    config = ReAttentionConfig.preset(preset) if preset else None
    return ReAttentionEngine.from_pretrained(model, gguf_file=gguf_file, config=config, cache=cache, offload=offload)


def host_memory() -> dict:
    """This process's resident host memory by kind, in GiB (Linux ``/proc/self/status``)."""
    fields = {
        "RssAnon": "rss_anon_gib",
        "RssFile": "rss_file_gib",
        "RssShmem": "rss_shmem_gib",
        "VmHWM": "peak_rss_gib",
    }
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                out[fields[name]] = int(value.split()[0]) / 2**20  # kB -> GiB
    return out


def store_memory(engine: ReAttentionEngine) -> dict:
    """Host bytes of the cached stores' buffers and the tokens they hold in mapped pages."""
    segments = engine._prefix.memory._segments if engine._prefix is not None else []
    mapped = [getattr(s.store, "mapped_tokens", lambda: 0)() for s in segments]
    return {"store_host_bytes": sum(s.store.nbytes("cpu") for s in segments), "mapped_tokens": max(mapped, default=0)}


def cache_config(cache_dir: Path, kv_bytes: int) -> CacheConfig:
    if torch.cuda.is_available():
        memory = int(torch.cuda.get_device_properties(0).total_memory * 0.6)
    else:
        memory = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.6)
    return CacheConfig(dir=cache_dir, disk_bytes=2 * kv_bytes + (1 << 30), memory_bytes=memory)


def kv_bytes_estimate(engine: ReAttentionEngine, tokens: int) -> int:
    cfg = engine.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(engine.model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * itemsize * tokens


def ask(engine: ReAttentionEngine, corpus: str, progress: bool) -> tuple[dict, float]:
    """TTFT of the question, with how much came from the cache and how long restoring took."""
    restore = {"s": 0.0}
    prefix = engine._prefix
    real_begin = prefix.begin

    def timed_begin(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        run = real_begin(*args, **kwargs)
        sync()
        restore["s"] = time.perf_counter() - t0
        return run

    prefix.begin = timed_begin
    try:
        sync()
        t0 = time.perf_counter()
        res = engine.generate(QUESTION, context=corpus, max_new_tokens=1, progress=progress)
        sync()
        ttft = time.perf_counter() - t0
    finally:
        del prefix.begin
    row = {
        "ttft_s": ttft,
        "restore_s": restore["s"],
        "prompt_tokens": res.prompt_tokens,
        "cached_tokens": res.cached_tokens,
        "prefilled_tokens": res.prompt_tokens - res.cached_tokens,
        "first_token": res.token_ids[0] if res.token_ids else None,
    }
    return row, ttft


def drop_page_cache(cache_dir: Path) -> int:
    """Ask the kernel to drop its cached copies of the page files (clean pages only). Returns files."""
    n = 0
    for path in cache_dir.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def child_main(spec: dict) -> int:
    """The fresh process of the ``disk`` phases: load, ask once, print one JSON line."""
    t0 = time.perf_counter()
    offload = offload_config(spec["offload"], spec["offload_budget"], spec["map_pages"])
    cache = cache_config(Path(spec["cache_dir"]), spec["kv_bytes"])
    engine = load_engine(spec["model"], spec["gguf_file"], cache, offload)
    load_s = time.perf_counter() - t0
    # As a server does at start-up, pay the process's one-time costs (CUDA context, Triton kernel
    # compilation or loading for every query shape) before the question; it bypasses the cache.
    warmup_s = engine.warmup()
    corpus = Path(spec["corpus_file"]).read_text()
    row, _ = ask(engine, corpus, progress=False)
    row.update(load_s=load_s, warmup_s=warmup_s, **host_memory(), **store_memory(engine))
    if spec["decode"]:  # again from memory: one token, then 1 + N tokens; the difference is N decode steps
        _, one = ask(engine, corpus, progress=False)
        sync()
        t0 = time.perf_counter()
        res = engine.generate(QUESTION, context=corpus, max_new_tokens=1 + spec["decode"])
        sync()
        steps = len(res.token_ids) - 1  # fewer if the answer ends early
        row.update(decode_steps=steps, decode_ms=1e3 * (time.perf_counter() - t0 - one) / steps if steps else None)
    print("RESULT " + json.dumps(row), flush=True)
    return 0


def previous_cold(out: Path, key: dict) -> dict | None:
    if not out.is_file():
        return None
    found = None
    for line in out.read_text().splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if row.get("phase") == "cold" and all(row.get(k) == v for k, v in key.items()):
                found = row
    return found


def _drop_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(paths: list[Path], workers: int, crc: bool) -> int:
    """Read every file into a pinned buffer of its own (and CRC-32 it) on ``workers`` threads; bytes read."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    def one(path: Path) -> int:
        buf = torch.empty(path.stat().st_size, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(buf.numpy()))
        if crc:
            zlib.crc32(buf.numpy())
        return buf.numel()

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, paths))


def _restore(cache, fp, refs, layers: int, dtype: torch.dtype) -> dict:
    """Load every page and extend a CUDA store with it: total seconds, and the main thread's waits and launches."""
    from reattention_core.store import ResidentStore

    store = ResidentStore(layers)
    store.reserve(sum(r.tokens for r in refs))
    torch.cuda.synchronize()
    wait = launch = 0.0
    t0 = time.perf_counter()
    pages = cache.load(fp, refs, num_layers=layers, dtype=dtype, pin=True)
    while True:
        a = time.perf_counter()
        page = next(pages, None)
        b = time.perf_counter()
        wait += b - a
        if page is None:
            break
        keys, values = page
        for layer in range(layers):
            store.extend(layer, keys[layer].unsqueeze(0), values[layer].unsqueeze(0), device="cuda", dtype=dtype)
        launch += time.perf_counter() - b
    torch.cuda.synchronize()
    return {"s": time.perf_counter() - t0, "wait_s": wait, "launch_s": launch}


def restore_profile(args: argparse.Namespace) -> int:
    """`--restore-profile`: where the time of a disk-cache restore goes (see the module docstring)."""
    from reattention_core.cache.disk import DiskCache
    from reattention_core.cache.fingerprint import FORMAT_VERSION, EngineFingerprint
    from reattention_core.cache.page_file import PageRef, page_file_name

    if not torch.cuda.is_available():
        raise SystemExit("--restore-profile needs a CUDA device")
    folder = args.cache_dir or Path(tempfile.mkdtemp(prefix="reattention-restore-"))
    shutil.rmtree(folder, ignore_errors=True)
    dtype, page_size, layers = torch.bfloat16, 1024, args.layers
    cache = DiskCache(folder, 1 << 50, workers=args.workers)
    fp = EngineFingerprint({"format": str(FORMAT_VERSION), "model": "synthetic"})
    ns = cache.namespace_dir(fp)
    names = [f"{i:064x}" for i in range(1, args.restore_profile + 1)]
    refs = [PageRef(ns / page_file_name(i, k), k, p, i, page_size)
            for i, (k, p) in enumerate(zip(names, [fp.root] + names[:-1], strict=True))]  # fmt: skip
    row = {"bench": "restore_profile", **environment(), "cpus": os.cpu_count(), "workers": args.workers,
           "pages": len(refs), "page_size": page_size, "shape": [layers, args.heads, args.head_dim]}  # fmt: skip
    base = torch.randn(page_size, args.heads, args.head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    t0 = time.perf_counter()
    for i, ref in enumerate(refs):  # distinct bytes per page and layer
        keys, values = [base + (i + j) for j in range(layers)], [base - (i + j) for j in range(layers)]
        assert cache.save(fp, ref, keys, values) == "written"
    row["write_s"] = round(time.perf_counter() - t0, 3)
    paths = [r.path for r in refs]
    row["bytes"] = sum(p.stat().st_size for p in paths)
    gb = row["bytes"] / 1e9
    for phase in ("read", "read+crc", "load", "restore", "restore", "restore-cold"):
        t0 = time.perf_counter()
        if phase.startswith("read"):
            _read_all(paths, args.workers, crc=phase == "read+crc")
            result = {"s": time.perf_counter() - t0}
        elif phase == "load":
            assert sum(1 for _ in cache.load(fp, refs, num_layers=layers, dtype=dtype, pin=True)) == len(refs)
            result = {"s": time.perf_counter() - t0}
        else:
            if phase == "restore-cold":
                _drop_page_cache(paths)
            result = _restore(cache, fp, refs, layers, dtype)
        result = {"phase": phase, **{k: round(v, 3) for k, v in result.items()}, "GB_per_s": round(gb / result["s"], 2)}
        row.setdefault("phases", []).append(result)
        print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768])
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder, deleted at the end")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the corpus files go (default: temporary)")
    ap.add_argument("--progress", action="store_true", help="show prefill progress bars")
    ap.add_argument("--offload", choices=("none", "values", "host"), default="none", help="the engine's KV store")
    ap.add_argument("--offload-budget", type=int, default=None, help="with --offload host: blocks read (approximate)")
    ap.add_argument(
        "--map-pages",
        nargs="+",
        choices=("on", "off"),
        default=["on"],
        help="with --offload host: run each disk phase with these map_pages settings",
    )
    ap.add_argument("--decode", type=int, default=0, help="disk phases: also time this many decode steps")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--restore-profile",
        type=int,
        default=None,
        metavar="PAGES",
        help="profile a restore of PAGES synthetic pages instead (see above)",
    )
    ap.add_argument("--layers", type=int, default=30, help="--restore-profile: the pages' layers")
    ap.add_argument("--heads", type=int, default=3, help="--restore-profile: KV heads")
    ap.add_argument("--head-dim", type=int, default=64, help="--restore-profile: head dim")
    ap.add_argument("--workers", type=int, default=16, help="--restore-profile: reading threads")
    args = ap.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if args.restore_profile:
        return restore_profile(args)

    tmp_root = Path(tempfile.mkdtemp(prefix="reattention-bench-cache-"))
    cache_root = args.cache_dir or tmp_root / "cache"
    work = args.work_dir or tmp_root
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    engine = load_engine(args.model, args.gguf_file, CacheConfig(enabled=False))
    offload = offload_config(args.offload, args.offload_budget)
    print(f"model loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    try:
        for tokens in args.tokens:
            cache_dir = cache_root / f"n{tokens}"
            kv = kv_bytes_estimate(engine, tokens + 4096)
            cached_engine = ReAttentionEngine(
                engine.model,
                engine.tokenizer,
                engine.config,
                offload=offload,
                model_name=engine.model_name,
                cache=cache_config(cache_dir, kv),
            )
            corpus_file = work / f"corpus-{tokens}.txt"
            if not corpus_file.is_file():
                corpus_file.write_text(corpus_text(engine.tokenizer, tokens))
            corpus = corpus_file.read_text()
            base = {
                "bench": "cache",
                "model": engine.model_name,
                "tokens": tokens,
                **env,
                "offload": args.offload,
                "offload_budget": args.offload_budget,
                "config": engine.config.to_dict(),
                "page_size": cached_engine.cache_config.page_size_for(engine.config),
            }
            cold = previous_cold(args.out, {k: base[k] for k in ("model", "tokens", "device")})
            cold_ttft = cold["ttft_s"] if cold else None
            cold_token = cold["first_token"] if cold else None
            maps = [m == "on" for m in args.map_pages] if args.offload == "host" else [True]
            jobs = [(phase, m) for phase in args.phases for m in (maps if phase.startswith("disk") else [None])]
            for phase, map_pages in jobs:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                row = {**base, "phase": phase}
                if map_pages is not None and args.offload == "host":
                    row["map_pages"] = map_pages
                if phase == "cold":
                    if cache_dir.exists():
                        shutil.rmtree(cache_dir)
                    disk = cached_engine._prefix.disk
                    writes = {"s": 0.0}
                    real_save = disk.save

                    def timed_save(*a, real_save=real_save, writes=writes, **kw):
                        t = time.perf_counter()
                        try:
                            return real_save(*a, **kw)
                        finally:
                            writes["s"] += time.perf_counter() - t

                    disk.save = timed_save
                    try:
                        result, ttft = ask(cached_engine, corpus, args.progress)
                    finally:
                        del disk.save
                    result["page_write_s"] = writes["s"]
                    cold_ttft, cold_token = ttft, result["first_token"]
                    info = cached_engine.cache_info()
                    result.update(
                        disk_bytes=info.disk.bytes if info.disk else 0, disk_pages=info.disk.pages if info.disk else 0
                    )
                elif phase == "memory":
                    result, ttft = ask(cached_engine, corpus, args.progress)
                else:
                    cached_engine.clear_cache(disk=False)  # free this process's copy before the child loads
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if phase == "disk-cold":
                        result_files = drop_page_cache(cache_dir)
                        row["page_cache_dropped_files"] = result_files
                    spec = {
                        "model": args.model,
                        "gguf_file": args.gguf_file,
                        "cache_dir": str(cache_dir),
                        "kv_bytes": kv,
                        "corpus_file": str(corpus_file),
                        "offload": args.offload,
                        "offload_budget": args.offload_budget,
                        "map_pages": map_pages,
                        "decode": args.decode,
                    }
                    proc = subprocess.run(
                        [sys.executable, __file__, "--out", str(args.out), "--child", json.dumps(spec)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        raise RuntimeError(f"the fresh process failed:\n{proc.stderr[-4000:]}")
                    result = json.loads(lines[-1].removeprefix("RESULT "))
                    ttft = result["ttft_s"]
                row.update(result)
                if cold_ttft and phase != "cold":
                    row["speedup_vs_cold"] = cold_ttft / ttft
                    row["same_first_token_as_cold"] = result["first_token"] == cold_token
                with args.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                shown = {
                    k: row[k]
                    for k in (
                        "tokens",
                        "phase",
                        "map_pages",
                        "ttft_s",
                        "cached_tokens",
                        "prefilled_tokens",
                        "restore_s",
                        "load_s",
                        "warmup_s",
                        "speedup_vs_cold",
                        "same_first_token_as_cold",
                        "rss_anon_gib",
                        "rss_file_gib",
                        "store_host_bytes",
                        "mapped_tokens",
                        "decode_ms",
                    )
                    if k in row
                }
                print(json.dumps(shown), flush=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)  # holds only what was not given a folder
    return 0


if __name__ == "__main__":
    with contextlib.redirect_stderr(io.StringIO()) if "--child" in sys.argv else contextlib.nullcontext():
        sys.exit(main())
