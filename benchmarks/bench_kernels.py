"""Benchmark the Triton kernels on a CUDA GPU (correctness gate first), and sweep their tuning choices.

    python benchmarks/bench_kernels.py [--out DIR] [--tag TAG] [--skip-tests] [--models M ...]
                                       [--sweep [PART ...]] [--sweep-only] [--dry-run]

1. Runs ``pytest tests/kernels`` (the GPU cases included) and refuses to time anything if it fails.
2. Measures the device's rooflines in the same process: a device-to-device copy (bytes read +
   written / time) and a dense bf16 ``torch.matmul``.
3. Times every op, L2 flushed before each run: ``graph_ms`` (median GPU time of a CUDA-graph replay,
   the kernel time of a graphed step), ``eager_ms`` (``triton.testing.do_bench`` of the eager call)
   and ``host_us`` (host time of one eager call), for each of ``--models`` (SmolLM2-135M 9/3/64,
   Llama-3.1-8B 32/8/128, Qwen2.5-Coder-1.5B 12/2/128; bf16):
   a. scoring, decode: 1 query, 128K and 1M keys, top-8; GB/s = key bytes / graph time;
   b. scoring, prefill: 512/1024/2048 queries x 32K/128K keys, top-8, and the embedded preset's chunk
      (256 queries, top-4) at 128K and 1M; TFLOP/s = 2 TQ HQ TK D / time; two phases and one pass;
   c. scope attention, decode and prefill (512 queries) over ~1.3K and ~8K scopes, against SDPA on an
      already gathered and rotated copy, and against the unfused torch pipeline.
4. ``--sweep [PART ...]`` first times tuning choices (all parts when none is named; `SWEEPS`), each
   variant checked against the default's output; ``--sweep-only`` skips 3.
5. Writes ``kernels-<tag>.json`` (JSON lines) and ``kernels-<tag>.md`` under ``--out``.

``--dry-run`` runs every check at small sizes without timing, on a CPU under ``TRITON_INTERPRET=1``:
a test of this script without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"SmolLM2-135M": (9, 3, 64), "Llama-3.1-8B": (32, 8, 128), "Qwen2.5-Coder-1.5B": (12, 2, 128)}
# a decode step's settings, as each model's engine config has them: (top_k, max_blocks, block, sink, local)
STEPS = {"SmolLM2-135M": (4, 32, 32, 64, 256), "Llama-3.1-8B": (4, 256, 32, 32, 8192),
         "Qwen2.5-Coder-1.5B": (4, 256, 32, 32, 8192)}  # fmt: skip
HBM_NOMINAL = {"H100": 3350.0, "H200": 4800.0}  # GB/s, SXM datasheet values
SWEEPS = {
    "topk-prefill": "prefill scoring in one pass: block shapes",
    "topk-decode": "decode scan: tile shapes, pipeline stages and split counts",
    "topk-splits": "prefill scoring: the key-split count at the engines' chunk shapes",
    "topk-phases": "prefill scoring: one pass against two phases, phase 1 shapes, sub-tiles, phase 2 by rows or tiles",
    "decode-merge": "decode scoring: split counts and merge shapes, kernel by kernel",
    "decode-select": "a decode step's scoring + selection: one program against the histogram path",
    "decode-epilogues": "a decode step's split kernels merging (and selecting) in their last program or not",
    "attention": "prefill scope attention: block shapes",
    "attention-decode": "decode scope attention: block shapes",
}


def ensure_importable() -> dict[str, str]:
    """Make ``reattention_kernels`` importable from a plain checkout (shim if not installed)."""
    env = dict(os.environ)
    if importlib.util.find_spec("reattention_kernels") is None:
        shim = Path(tempfile.mkdtemp(prefix="reattention-shim-"))
        (shim / "reattention_kernels").symlink_to(ROOT / "kernels", target_is_directory=True)
        sys.path.insert(0, str(shim))
        env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT), env.get("PYTHONPATH", "")])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return env


def run_gate(env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "kernels"), "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
        sys.exit(f"kernel tests failed (exit {rc}): refusing to benchmark")


def git_rev() -> str:
    if os.environ.get("REATTENTION_COMMIT"):  # an exported copy (the GPU machine) has no .git
        return os.environ["REATTENTION_COMMIT"]
    try:
        rev = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL) != 0
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def capture_graph(fn):
    """A CUDA graph of ``fn``, recorded after one warm-up call on a side stream (Triton compiles there)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_ms(graph, reps: int = 30, flush=None) -> float:
    """Median GPU milliseconds of ``reps`` replays of ``graph``; ``flush`` (a large tensor) is zeroed
    before each one to empty the L2."""
    import torch

    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def cuda_kernel_times(trace, name=lambda raw: raw) -> tuple[dict[str, float], dict[str, int]]:
    """Device microseconds and launches per kernel of a `torch.profiler` trace, keyed by ``name(raw name)``."""
    import torch

    times: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for ev in trace.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[name(ev.name)] += ev.time_range.elapsed_us()
            launches[name(ev.name)] += 1
    return times, launches


class Timer:
    """CUDA-graph and eager timings with the L2 flushed before every run; NaN everywhere with ``dry``."""

    def __init__(self, torch, dry: bool = False) -> None:
        self.torch, self.dry = torch, dry
        self.flush = None if dry else torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def graph_ms(self, fn, reps: int = 30) -> float:
        return math.nan if self.dry else replay_ms(capture_graph(fn), reps, self.flush)

    def eager_ms(self, fn) -> float:
        if self.dry:
            return math.nan
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def host_us(self, fn, n: int = 50) -> float:
        if self.dry:
            return math.nan
        fn()
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        self.torch.cuda.synchronize()
        return 1e6 * dt / n

    def all(self, fn, host: bool = True) -> dict[str, float]:
        out = {"graph_ms": round(self.graph_ms(fn), 4), "eager_ms": round(self.eager_ms(fn), 4)}
        if host:
            out["host_us"] = round(self.host_us(fn), 1)
        return out

    def kernels(self, fn, reps: int = 20) -> dict[str, float]:
        """Device ms per replay of each kernel of ``fn``'s graph, largest first (L2 warm)."""
        if self.dry:
            return {}
        from torch.profiler import ProfilerActivity, profile

        graph = capture_graph(fn)
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            for _ in range(reps):
                graph.replay()
            self.torch.cuda.synchronize()
        times, _ = cuda_kernel_times(trace, name=lambda raw: raw[:60])
        return {k: round(us / reps / 1000, 4) for k, us in sorted(times.items(), key=lambda kv: -kv[1])}

    def copy_gbs(self) -> float:
        """GB/s (bytes read + written) of a 1 GiB device-to-device copy: the bandwidth rows' roofline."""
        if self.dry:
            return math.nan
        src = self.torch.empty(1 << 30, dtype=self.torch.uint8, device="cuda")
        return 2 * src.numel() / self.eager_ms(partial(self.torch.empty_like(src).copy_, src)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="file suffix (default: device name)")
    ap.add_argument("--skip-tests", action="store_true", help="time without the correctness gate")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--sweep", nargs="*", choices=list(SWEEPS), default=None, metavar="PART",
                    help="also time tuning choices of these parts (default: all): "
                    + "; ".join(f"{k}: {v}" for k, v in SWEEPS.items()))  # fmt: skip
    ap.add_argument("--sweep-only", action="store_true", help="time only the sweep (implies --sweep)")
    ap.add_argument("--dry-run", action="store_true", help="checks only, small sizes (CPU: TRITON_INTERPRET=1)")
    args = ap.parse_args()
    sweep = set(args.sweep or SWEEPS) if args.sweep is not None or args.sweep_only else set()

    env = ensure_importable()
    import torch
    import triton

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --dry-run with TRITON_INTERPRET=1)")
    if not args.skip_tests and not dry:
        run_gate(env)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    tag = args.tag or (name.split()[1].lower() if dev.type == "cuda" and len(name.split()) > 1 else "dry-run")
    sms = torch.cuda.get_device_properties(0).multi_processor_count if dev.type == "cuda" else 4
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "git": git_rev(), "sms": sms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"kernels-{tag}.json"
    jsonl.write_text(json.dumps({"kind": "meta", **meta}) + "\n")
    rows: list[dict] = []

    def emit(**row) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    timer = Timer(torch, dry)
    copy_gbs = timer.copy_gbs()
    mm_tflops = math.nan
    if not dry:
        mat = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        mm_tflops = 2 * 8192**3 / timer.eager_ms(partial(torch.matmul, mat, mat.T.contiguous())) / 1e9
        del mat
    nominal = next((v for k, v in HBM_NOMINAL.items() if k in name), math.nan)
    emit(kind="roofline", copy_gbs=round(copy_gbs, 1), hbm_nominal_gbs=nominal, bf16_matmul_tflops=round(mm_tflops, 1))

    cases = Cases(torch, dev, timer, emit, dry, args.models, sms)
    for part in SWEEPS:
        if part in sweep:
            getattr(cases, "sweep_" + part.replace("-", "_"))()
    if args.sweep_only:
        return
    cases.scoring_decode(copy_gbs, nominal)
    cases.scoring_prefill(mm_tflops)
    cases.scope_attention()
    (out / f"kernels-{tag}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def same_up_to_rounding(q, keys, out, ref) -> bool:
    """True where two scorings' hits ``out`` and ``ref`` are equal, or differ only among keys whose fp64
    scores tie to 1e-6 relative (phase 2 by rows sums in plain fp32, one pass on tensor cores)."""
    bad = (out != ref).any(-1)
    for b, t, hh in bad.nonzero().tolist():
        qq, kk = q[b, t, hh].double(), keys[b, :, hh // (q.shape[2] // keys.shape[2])].double()
        so = (kk[out[b, t, hh]] @ qq).sort(descending=True).values
        sr = (kk[ref[b, t, hh]] @ qq).sort(descending=True).values
        if (so - sr).abs().max() > 1e-6 * sr.abs().max():
            return False
    return True


class Cases:
    """The timed cases and sweeps; in a dry run, at small sizes, in fp32, without timings."""

    def __init__(self, torch, dev, timer: Timer, emit, dry: bool, models: list[str], sms: int) -> None:
        self.torch, self.dev, self.timer, self.emit, self.dry, self.sms = torch, dev, timer, emit, dry, sms
        self.models = {m: MODELS[m] for m in models}
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.gen = torch.Generator(device=dev).manual_seed(0)

    def keys(self, n: int) -> int:
        return max(256, n // 512) if self.dry else n

    def rows(self, tq: int) -> int:
        return min(tq, 5) if self.dry else tq

    def randn(self, *shape: int):
        return self.torch.randn(*shape, device=self.dev, dtype=self.dtype, generator=self.gen)

    def middle(self, tk: int, h: int, d: int):
        """The middle slice of a store with 4 sink and 256 local tokens."""
        return self.randn(1, tk + 260, h, d)[:, 4 : 4 + tk]

    def scope_case(self, model: str, tq: int, scope: int, t_store: int = 65536):
        torch = self.torch
        hq, h, d = MODELS[model]
        if self.dry:
            tq, scope, t_store = self.rows(tq), min(scope, 300), 1024
        sink, local = 4, max(256 if not self.dry else 32, tq)
        ns, local_start = scope - sink - local, t_store - local
        sel = torch.randperm(local_start - sink, device=self.dev)[:ns].sort().values.add(sink)[None]
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=self.dev).float() / d))
        kw = {"sink_len": sink, "local_start": local_start, "inv_freq": inv_freq, "attention_scaling": 1.0,
              "scale": d**-0.5}  # fmt: skip
        q, kst, vst = self.randn(1, tq, hq, d), self.randn(1, t_store, h, d), self.randn(1, t_store, h, d)
        return q, kst, vst, sel, torch.tensor([ns], device=self.dev), kw, scope

    def graph(self, fn) -> dict:
        try:
            return {"graph_ms": round(self.timer.graph_ms(fn), 4)}
        except Exception as exc:  # noqa: BLE001  (a config that does not fit the chip is reported, not fatal)
            return {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}

    # -- the tables ----------------------------------------------------------------------------

    def scoring_decode(self, copy_gbs: float, nominal: float) -> None:
        from reattention_kernels.triton_ops.topk import score_topk_fwd

        for model, (hq, h, d) in self.models.items():
            for tk in (131072, 1048576):
                k, q = self.middle(self.keys(tk), h, d), self.randn(1, 1, hq, d)
                t = self.timer.all(partial(score_topk_fwd, q, k, 8))
                gbs = k.shape[1] * h * d * 2 / t["graph_ms"] / 1e6
                self.emit(kind="score_topk_decode", model=model, TQ=1, TK=tk, HQ=hq, H=h, D=d, top_k=8, **t,
                          GBps=round(gbs, 1), pct_copy=round(100 * gbs / copy_gbs, 1),
                          pct_nominal=round(100 * gbs / nominal, 1))  # fmt: skip

    def scoring_prefill(self, mm_tflops: float) -> None:
        """The default two phases against one pass, on the same inputs."""
        from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

        shapes = [(m, tk, tq, 8) for m in self.models for tk in (32768, 131072) for tq in (512, 1024, 2048)]
        if "SmolLM2-135M" in self.models:  # the embedded preset's chunks: 256 tokens, top-4, to a 1M middle
            shapes += [("SmolLM2-135M", tk, 256, 4) for tk in (131072, 1048576)]
        for model, tk, tq, top_k in shapes:
            hq, h, d = MODELS[model]
            k, q = self.middle(self.keys(tk), h, d), self.randn(1, self.rows(tq), hq, d)
            for phases in (2, 1):
                fn = partial(score_topk_fwd, q, k, top_k, tuning=TopkTuning(two_phase=phases == 2))
                t = self.timer.all(fn, host=False)
                tflops = 2 * tq * hq * tk * d / t["graph_ms"] / 1e9
                self.emit(
                    kind="score_topk_prefill",
                    model=model,
                    TQ=tq,
                    TK=tk,
                    HQ=hq,
                    H=h,
                    D=d,
                    top_k=top_k,
                    phases=phases,
                    **t,
                    TFLOPs=round(tflops, 1),
                    pct_matmul=round(100 * tflops / mm_tflops, 1),
                )

    def scope_attention(self) -> None:
        """Against SDPA on a gathered, rotated scope, and against the unfused torch pipeline."""
        from torch.nn.attention.bias import causal_lower_right
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        from reattention_kernels.triton_ops.attention import scope_attention_fwd

        for model, (hq, h, d) in self.models.items():
            for tq in (1, 512):
                for scope in (1312, 8196):
                    q, kst, vst, sel, n_sel, kw, scope = self.scope_case(model, tq, scope)
                    tq = q.shape[1]
                    mask = causal_lower_right(tq, scope) if tq > 1 else None
                    with self.torch.no_grad():
                        qg, kg, vg = (x.contiguous() for x in gather_rotate(q, kst, vst, sel, kw))
                    t = self.timer.all(partial(scope_attention_fwd, q, kst, vst, sel, n_sel, **kw))
                    t_sdpa = self.timer.graph_ms(partial(sdpa, qg, kg, vg, attn_mask=mask, scale=kw["scale"]))
                    t_unf = self.timer.graph_ms(partial(gather_rotate_sdpa, q, kst, vst, sel, kw, mask))
                    pairs = tq * (scope - tq) + tq * (tq + 1) // 2  # visible (query, key) pairs
                    self.emit(kind="scope_attention", model=model, TQ=tq, L=scope, HQ=hq, H=h, D=d, **t,
                              sdpa_gathered_ms=round(t_sdpa, 4), unfused_torch_ms=round(t_unf, 4),
                              vs_sdpa=round(t_sdpa / t["graph_ms"], 2), vs_unfused=round(t_unf / t["graph_ms"], 2),
                              TFLOPs=round(4 * hq * d * pairs / t["graph_ms"] / 1e9, 1),
                              kv_GBps=round(2 * scope * h * d * 2 / t["graph_ms"] / 1e6, 1))  # fmt: skip

    # -- sweeps ----------------------------------------------------------------------------------

    def sweep_topk_prefill(self) -> None:
        from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

        for model, (hq, h, d) in self.models.items():
            for tq, tk in ((2048, 131072), (512, 32768)):
                k, q = self.middle(self.keys(tk), h, d), self.randn(1, self.rows(tq), hq, d)
                want = score_topk_fwd(q, k, 8, tuning=TopkTuning(two_phase=False))
                for cfg in ((64, 128, 4, 3), (32, 128, 4, 3), (64, 256, 4, 3), (64, 128, 4, 4), (64, 128, 8, 3)):
                    fn = partial(score_topk_fwd, q, k, 8, tuning=TopkTuning(two_phase=False, config=cfg))
                    t = self.graph(fn)
                    tf = {"TFLOPs": round(2 * tq * hq * tk * d / t["graph_ms"] / 1e9, 1)} if "graph_ms" in t else {}
                    self.emit(kind="sweep_topk_prefill", model=model, TQ=tq, TK=tk, config=cfg,
                              same=bool(self.torch.equal(fn(), want)), **t, **tf)  # fmt: skip

    def sweep_topk_decode(self) -> None:
        """One query: tile shapes x split counts (the default, and 1, 3 and 4 programs per SM)."""
        import triton

        from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

        configs = ((16, 128, 4, 3), (16, 128, 4, 4), (16, 128, 8, 3), (16, 256, 4, 3), (16, 256, 8, 3),
                   (16, 256, 4, 2), (16, 64, 4, 4), (16, 128, 2, 3))  # fmt: skip
        for model, (hq, h, d) in self.models.items():
            top_k = STEPS[model][0]
            for tk in (131072, 1048576):
                k, q = self.middle(self.keys(tk), h, d), self.randn(1, 1, hq, d)
                want = score_topk_fwd(q, k, top_k)
                for cfg in configs:
                    for splits in (None, *(triton.cdiv(n * self.sms, h) for n in (1, 3, 4))):
                        fn = partial(score_topk_fwd, q, k, top_k, tuning=TopkTuning(config=cfg, splits=splits))
                        t = self.graph(fn)
                        bw = {"GBps": round(k.shape[1] * h * d * 2 / t["graph_ms"] / 1e6, 1)} if "graph_ms" in t else {}
                        self.emit(
                            kind="sweep_topk_decode",
                            model=model,
                            TK=tk,
                            top_k=top_k,
                            config=cfg,
                            splits=splits or "auto",
                            same=bool(self.torch.equal(fn(), want)),
                            **t,
                            **bw,
                        )

    def sweep_topk_splits(self) -> None:
        """Prefill scoring (both phases, top-4) at the engines' chunk shapes with the split count forced."""
        from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

        shapes = {"Llama-3.1-8B": ((512, 131072), (512, 32768), (2048, 131072), (1024, 131072)),
                  "SmolLM2-135M": ((256, 131072), (256, 1048576)),
                  "Qwen2.5-Coder-1.5B": ((512, 131072), (512, 32768))}  # fmt: skip
        for model, (hq, h, d) in self.models.items():
            for tq, tk in shapes[model]:
                q, k = self.randn(1, self.rows(tq), hq, d), self.randn(1, self.keys(tk), h, d)
                want = score_topk_fwd(q, k, 4)
                for splits in (None, 1, 2, 3, 4, 6):
                    fn = partial(score_topk_fwd, q, k, 4, tuning=TopkTuning(splits=splits))
                    t = self.graph(fn)
                    tf = {"TFLOPs": round(2 * tq * hq * tk * d / t["graph_ms"] / 1e9, 1)} if "graph_ms" in t else {}
                    self.emit(kind="sweep_topk_splits", model=model, TQ=tq, TK=tk, splits=splits or "auto",
                              same=bool(self.torch.equal(fn(), want)), **t, **tf)  # fmt: skip

    def sweep_topk_phases(self) -> None:
        """Prefill chunks in one pass against two phases: the default plan, phase 1's block shapes,
        sub-tiles, phase 2 by rows or by tiles. ``randn`` keys are i.i.d.; ``heavy`` scales every 4096th
        key by 4 (a few keys that many rows share). Each result is checked against one pass."""
        from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

        shapes = {"SmolLM2-135M": ((256, 16384, 4), (256, 131072, 4), (256, 1048576, 4), (32, 131072, 4)),
                  "Llama-3.1-8B": ((512, 32768, 4), (512, 131072, 4), (2048, 131072, 8)),
                  "Qwen2.5-Coder-1.5B": ((512, 32768, 4), (512, 131072, 4))}  # fmt: skip
        variants = {"two-default": TopkTuning(two_phase=True)}
        for cfg in ((128, 64, 4, 3), (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3)):
            variants["two-{}x{}x{}w{}s".format(*cfg)] = TopkTuning(two_phase=True, config=cfg, rescore_by="rows")
        for sub in (2, 4):
            variants[f"two-rows-s{sub}"] = TopkTuning(two_phase=True, subtiles=sub, rescore_by="rows")
        variants["two-rows"] = TopkTuning(two_phase=True, subtiles=1, rescore_by="rows")
        for w in ((16, 2), (16, 4), (32, 4)):
            variants["two-tiles-{}x{}".format(*w)] = TopkTuning(two_phase=True, rescore_by="tiles", tile_rescore=w)
        for model, (hq, h, d) in self.models.items():
            for tq, tk, top_k in shapes[model]:
                k, q = self.middle(self.keys(tk), h, d), self.randn(1, self.rows(tq), hq, d)
                heavy = k.clone()
                heavy[:, ::4096] *= 4
                for data, keys in (("randn", k), ("heavy", heavy)):
                    one = partial(score_topk_fwd, q, keys, top_k, tuning=TopkTuning(two_phase=False))
                    ref = one()
                    row = {"kind": "sweep_topk_phases", "model": model, "TQ": tq, "TK": tk, "top_k": top_k,
                           "data": data, "one": self.graph(one).get("graph_ms")}  # fmt: skip
                    for name, tuning in variants.items():
                        fn = partial(score_topk_fwd, q, keys, top_k, tuning=tuning)
                        try:
                            if not same_up_to_rounding(q, keys, fn(), ref):
                                raise SystemExit(f"two phases differ from one pass: {model} {tq}x{tk} {data} {name}")
                        except ValueError as exc:  # a choice that does not apply to this shape
                            row[name] = f"ValueError: {exc}"[:100]
                            continue
                        row[name] = self.graph(fn).get("graph_ms")
                    self.emit(**row)

    def sweep_decode_merge(self) -> None:
        """Decode scoring's split count and merge shape (rows per program, candidates per step, warps),
        kernel by kernel."""
        from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

        merges = (None, (4, 512, 4), (4, 512, 8), (4, 256, 8), (1, 256, 4), (1, 512, 4))
        for model, (hq, h, d) in self.models.items():
            top_k = STEPS[model][0]
            for tk in (131072, 1048576):
                q, k = self.randn(1, 1, hq, d), self.randn(1, self.keys(tk), h, d)
                shift = self.torch.zeros(1, dtype=self.torch.int64, device=self.dev)
                want = score_topk_fwd(q, k, top_k, length=k.shape[1], shift=shift)
                for splits in (None, self.sms, self.sms // 3):
                    for merge in merges:
                        fn = partial(score_topk_fwd, q, k, top_k, length=k.shape[1], shift=shift,
                                     tuning=TopkTuning(splits=splits or None, merge=merge))  # fmt: skip
                        self.emit(
                            kind="sweep_decode_merge",
                            model=model,
                            TK=tk,
                            splits=splits or "auto",
                            merge=merge or "auto",
                            same=bool(self.torch.equal(fn(), want)),
                            graph_ms=round(self.timer.graph_ms(fn), 4),
                            kernels=self.timer.kernels(fn),
                        )

    def sweep_decode_select(self) -> None:
        """A decode step's scoring and selection, the selection in one program or by the histogram path
        (`KernelOptions.small_selection`), kernel by kernel; the outputs checked equal first."""
        from reattention_kernels import KernelOptions, score_select, score_topk

        for model, (hq, h, d) in self.models.items():
            top_k, max_blocks, block = STEPS[model][:3]
            for tk in (131072, 1048576):
                q, k = self.randn(1, 1, hq, d), self.randn(1, self.keys(tk), h, d)
                shift = self.torch.zeros(1, dtype=self.torch.int64, device=self.dev)
                scoring = partial(score_topk, q, k, top_k, length=k.shape[1], shift=shift,
                                  kernel_options=KernelOptions(backend="triton"))  # fmt: skip
                row = {"kind": "sweep_decode_select", "model": model, "TK": tk, "hits": hq * top_k,
                       "scoring_ms": round(self.timer.graph_ms(scoring), 4)}  # fmt: skip
                outs = []
                for path in ("default", "histogram"):
                    options = KernelOptions(backend="triton", small_selection=path == "default")
                    fn = partial(score_select, q, k, top_k, max_blocks, block, 0, length=k.shape[1], shift=shift,
                                 kernel_options=options)  # fmt: skip
                    outs.append(fn())
                    row[f"{path}_ms"] = round(self.timer.graph_ms(fn), 4)
                    row[f"{path}_kernels"] = self.timer.kernels(fn)
                row["same"] = all(self.torch.equal(a, b) for a, b in zip(*outs, strict=True))
                self.emit(**row)

    def sweep_decode_epilogues(self) -> None:
        """A decode step's selection (``select``), scope attention (``attention``) and both (``layer``)
        over a store of 128K and 1M tokens, with the epilogues on and off (`KernelOptions`), kernel by
        kernel. The selections are checked equal, the attention outputs compared; ``fused_taken``: the
        shape fits the selecting epilogue (at most 64 hits)."""
        from reattention_kernels import KernelOptions, scope_attention, score_select

        for model, (hq, h, d) in self.models.items():
            top_k, max_blocks, block, sink, local = STEPS[model]
            if self.dry:
                sink, local = 8, 64
            for tokens in (131072, 1048576):
                tokens = self.keys(tokens) + sink + local
                q, k, v = self.randn(1, 1, hq, d), self.randn(1, tokens, h, d), self.randn(1, tokens, h, d)
                shift = self.torch.zeros(1, dtype=self.torch.int64, device=self.dev)
                inv_freq = 1.0 / (100000.0 ** (self.torch.arange(0, d, 2, device=self.dev).float() / d))
                parts, outs = {}, {}
                for on in (True, False):
                    options = KernelOptions(backend="triton", fuse_decode_selection=on, fuse_decode_merge=on)
                    select = partial(score_select, q, k[:, sink:], top_k, max_blocks, block, sink,
                                     length=tokens - sink - local, shift=shift, kernel_options=options)  # fmt: skip
                    sel, n_sel = select()
                    attend = partial(scope_attention, q, k, v, sel, n_sel, sink_len=sink, local_start=tokens - local,
                                     inv_freq=inv_freq, attention_scaling=1.0, scale=d**-0.5, length=tokens,
                                     shift=shift, kernel_options=options)  # fmt: skip

                    def layer(select=select, attend=attend):
                        select()
                        return attend()

                    outs[on] = ((sel, n_sel), attend()[0])
                    parts[on] = {"select": select, "attention": attend, "layer": layer}
                row = {
                    "kind": "sweep_decode_epilogues",
                    "model": model,
                    "tokens": tokens,
                    "hits": hq * top_k,
                    "same_selection": all(
                        self.torch.equal(a, b) for a, b in zip(outs[True][0], outs[False][0], strict=True)
                    ),
                    "attention_max_diff": float((outs[True][1].float() - outs[False][1].float()).abs().max()),
                }
                for part in ("select", "attention", "layer"):
                    for on in (True, False):
                        name = f"{part}_{'on' if on else 'off'}"
                        row[f"{name}_ms"] = round(self.timer.graph_ms(parts[on][part]), 4)
                        row[f"{name}_kernels"] = self.timer.kernels(parts[on][part])
                if not self.dry:  # the scan selected in its last program if no merge kernel ran
                    row["fused_taken"] = not any("kernel_merge" in n for n in row["select_on_kernels"])
                self.emit(**row)

    def sweep_attention(self) -> None:
        """Prefill chunks over a scope: the embedded preset's (256 queries, 1,312 positions, as its sink of
        32 had it, so that results compare across commits) and Llama-8B's (512 queries, 16K positions)."""
        from reattention_kernels.triton_ops.attention import scope_attention_fwd

        for model, tq, scope in (("SmolLM2-135M", 256, 1312), ("Llama-3.1-8B", 512, 16388)):
            hq, h, d = MODELS[model]
            q, kst, vst, sel, n_sel, kw, scope = self.scope_case(model, tq, scope)
            pairs = tq * (scope - tq) + tq * (tq + 1) // 2
            for cfg in (None, (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2),
                        (128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2), (64, 64, 8, 3)):  # fmt: skip
                t = self.graph(partial(scope_attention_fwd, q, kst, vst, sel, n_sel, config=cfg, **kw))
                tf = {"TFLOPs": round(4 * pairs * hq * d / t["graph_ms"] / 1e9, 1)} if "graph_ms" in t else {}
                self.emit(
                    kind="sweep_scope_prefill", model=model, TQ=tq, scope=scope, config=cfg or "default", **t, **tf
                )

    def sweep_attention_decode(self) -> None:
        """One query over each model's scope (the embedded preset's 1,344 positions, 8,192 for the
        others' sizing at the time), split as the package splits it."""
        from reattention_kernels.triton_ops.attention import scope_attention_fwd

        for model in self.models:
            hq, h, d = MODELS[model]
            q, kst, vst, sel, n_sel, kw, scope = self.scope_case(model, 1, 1344 if model == "SmolLM2-135M" else 8192)
            for cfg in (None, (16, 64, 4, 2), (16, 64, 4, 3), (16, 32, 4, 2), (16, 128, 8, 2), (16, 64, 8, 2),
                        (16, 64, 2, 2)):  # fmt: skip
                t = self.graph(partial(scope_attention_fwd, q, kst, vst, sel, n_sel, config=cfg, **kw))
                bw = {"kv_GBps": round(2 * scope * h * d * 2 / t["graph_ms"] / 1e6, 1)} if "graph_ms" in t else {}
                self.emit(kind="sweep_scope_decode", model=model, scope=scope, config=cfg or "default", **t, **bw)


def gather_rotate(q, kst, vst, sel, kw):
    """The unfused path: gather one sequence's scope, rotate it, expand K/V to the query heads."""
    import torch

    from reattention_kernels.reference.attention import apply_rope_ref, rope_cos_sin

    dev, tq, t = q.device, q.shape[1], kst.shape[1]
    g = q.shape[2] // kst.shape[2]
    idx = torch.cat([torch.arange(kw["sink_len"], device=dev), sel[0], torch.arange(kw["local_start"], t, device=dev)])
    scope = idx.numel()
    cos, sin = rope_cos_sin(torch.arange(scope, device=dev), kw["inv_freq"], kw["attention_scaling"], q.dtype)
    k = apply_rope_ref(kst[0, idx], cos, sin).transpose(0, 1).repeat_interleave(g, 0)
    v = vst[0, idx].transpose(0, 1).repeat_interleave(g, 0)
    q = apply_rope_ref(q[0], cos[scope - tq :], sin[scope - tq :]).transpose(0, 1)
    return q[None], k[None], v[None]


def gather_rotate_sdpa(q, kst, vst, sel, kw, mask):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    return sdpa(*gather_rotate(q, kst, vst, sel, kw), attn_mask=mask, scale=kw["scale"])


def markdown(meta: dict, rows: list[dict]) -> str:
    roof = next(r for r in rows if r["kind"] == "roofline")
    lines = [
        f"# Kernel benchmark: {meta['device']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, git {meta['git']}, {meta['sms']} SMs; bf16, top-8 unless a "
        "column says otherwise.",
        "",
        "`graph ms`: median GPU time of a CUDA-graph replay, L2 flushed before each (kernel time); `eager ms`: "
        "`triton.testing.do_bench` median of the eager call (includes host launch gaps); `host us`: host time of "
        "one eager call. Rates use the graph time.",
        "",
        f"Rooflines measured in the same run: device-to-device copy {roof['copy_gbs']} GB/s (read + write), nominal "
        f"HBM {roof['hbm_nominal_gbs']} GB/s; dense bf16 matmul (8192^3) {roof['bf16_matmul_tflops']} TFLOP/s.",
        "",
        "## Scoring, decode (1 query; GB/s = key bytes read / time)",
        "",
        "| model | TK | graph ms | eager ms | host us | GB/s | % of copy | % of nominal HBM |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "score_topk_decode":
            lines.append(f"| {r['model']} | {r['TK']} | {r['graph_ms']} | {r['eager_ms']} | {r['host_us']} "
                         f"| {r['GBps']} | {r['pct_copy']} | {r['pct_nominal']} |")  # fmt: skip
    lines += [
        "",
        "## Scoring, prefill (TFLOP/s = 2 TQ HQ TK D / time)",
        "",
        "| model | TQ | TK | top-k | phases | graph ms | eager ms | TFLOP/s | % of bf16 matmul |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "score_topk_prefill":
            lines.append(f"| {r['model']} | {r['TQ']} | {r['TK']} | {r['top_k']} | {r['phases']} | {r['graph_ms']} "
                         f"| {r['eager_ms']} | {r['TFLOPs']} | {r['pct_matmul']} |")  # fmt: skip
    lines += [
        "",
        "## Scope attention (graph ms) vs SDPA on a pre-gathered, pre-rotated scope and vs unfused torch",
        "",
        "| model | TQ | scope | graph ms | eager ms | host us | SDPA gathered ms | unfused torch ms "
        "| vs SDPA | vs unfused | TFLOP/s | K+V GB/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "scope_attention":
            lines.append(f"| {r['model']} | {r['TQ']} | {r['L']} | {r['graph_ms']} | {r['eager_ms']} | {r['host_us']} "
                         f"| {r['sdpa_gathered_ms']} | {r['unfused_torch_ms']} | {r['vs_sdpa']} | {r['vs_unfused']} "
                         f"| {r['TFLOPs']} | {r['kv_GBps']} |")  # fmt: skip
    lines += ["", "`vs` columns: baseline time / Triton time (> 1 means the Triton op is faster)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
