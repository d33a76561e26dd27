"""Benchmark the Triton kernels on a CUDA GPU (correctness gate first).

    python benchmarks/bench_kernels.py [--out benchmarks/results] [--tag h100] [--skip-tests] [--sweep [PART ...]]
                                       [--sweep-only]

1. Runs ``pytest tests/kernels`` (the GPU cases included) and refuses to time anything if it fails.
2. Measures the device's practical rooflines in the same process: a device-to-device copy (bytes
   read + written / time) and a dense bf16 ``torch.matmul``.
3. Times every op two ways, L2 flushed before each run: ``graph_ms``, the median GPU time of a CUDA
   graph replay (kernel time, as in a graph-captured decode loop), and ``eager_ms``,
   ``triton.testing.do_bench`` on the eager call (adds the host's launch gaps when the GPU work is
   shorter than the launches); ``host_us`` is the host time of one eager call.
   a. scoring, decode: 1 query, TK = 128K and 1M, SmolLM2-135M (9/3/64) and Llama-3.1-8B (32/8/128)
      head shapes, bf16, top-8; GB/s = bytes of keys read / graph time;
   b. scoring, prefill: TQ = 512/1024/2048, TK = 32K/128K, top-8, and the embedded model's preset
      (TQ 256, top-4) at 128K and 1M; TFLOP/s = 2 TQ HQ TK D / graph time; the default two phases
      and one pass (``phases``) on the same inputs;
   c. scope attention, decode and prefill (TQ 512) over ~1.3K and ~8K scopes, against torch SDPA
      on an already-gathered, already-rotated copy of the same scope, and against the unfused
      torch pipeline (gather + RoPE + SDPA).
   ``--sweep [topk-prefill topk-decode attention attention-decode]`` first times a few block
   configurations and split counts of those parts (all when none is named; a tuning aid);
   ``--sweep-only`` times only the sweep (and the rooflines).
4. Writes ``kernels-<tag>.json`` (one JSON object per line) and ``kernels-<tag>.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"SmolLM2-135M": (9, 3, 64), "Llama-3.1-8B": (32, 8, 128)}
HBM_NOMINAL = {"H100": 3350.0, "H200": 4800.0}  # GB/s, SXM datasheet values
SWEEPS = ("topk-prefill", "topk-decode", "attention", "attention-decode")


def ensure_importable() -> dict[str, str]:
    """Make ``reattention_kernels`` importable from a plain checkout (shim if not installed)."""
    env = dict(os.environ)
    if importlib.util.find_spec("reattention_kernels") is None:
        shim = Path(tempfile.mkdtemp(prefix="reattention-shim-"))
        (shim / "reattention_kernels").symlink_to(ROOT / "kernels", target_is_directory=True)
        sys.path.insert(0, str(shim))
        env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT), env.get("PYTHONPATH", "")])
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
    if os.environ.get("REATTENTION_COMMIT"):  # an exported copy (the GPU machine) may sit inside another checkout
        return os.environ["REATTENTION_COMMIT"]
    try:
        rev = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL) != 0
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_REV", "unknown")


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


class Timer:
    """CUDA-graph and eager timings with the L2 flushed before every run."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def graph_ms(self, fn, reps: int = 30) -> float:
        return replay_ms(capture_graph(fn), reps, self.flush)

    def eager_ms(self, fn) -> float:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def host_us(self, fn, n: int = 50) -> float:
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

    def copy_gbs(self) -> float:
        """GB/s (bytes read + written) of a 1 GiB device-to-device copy: the bandwidth rows' roofline."""
        src = self.torch.empty(1 << 30, dtype=self.torch.uint8, device="cuda")
        return 2 * src.numel() / self.eager_ms(partial(self.torch.empty_like(src).copy_, src)) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="file suffix (default: device name)")
    ap.add_argument("--skip-tests", action="store_true", help="time without the correctness gate")
    ap.add_argument("--sweep", nargs="*", choices=SWEEPS, default=None, metavar="PART",
                    help=f"also time block configurations and split counts of these parts, of {', '.join(SWEEPS)} "
                    "(default: all)")  # fmt: skip
    ap.add_argument("--sweep-only", action="store_true", help="time only the sweep (implies --sweep)")
    args = ap.parse_args()
    sweep = set(args.sweep or SWEEPS) if args.sweep is not None or args.sweep_only else set()

    env = ensure_importable()
    import torch
    import triton

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if not args.skip_tests:
        run_gate(env)

    from reattention_kernels.triton_ops.attention import scope_attention_fwd
    from reattention_kernels.triton_ops.topk import score_topk_fwd

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    tag = args.tag or (name.split()[1].lower() if len(name.split()) > 1 else "gpu")
    meta = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "git": git_rev(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }  # fmt: skip
    rows: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"kernels-{tag}.json"
    jsonl.write_text(json.dumps({"kind": "meta", **meta}) + "\n")

    def emit(**row) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    timer = Timer(torch)
    copy_gbs = timer.copy_gbs()
    mat = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_tflops = 2 * 8192**3 / timer.eager_ms(partial(torch.matmul, mat, mat.T.contiguous())) / 1e9
    del mat
    nominal = next((v for k, v in HBM_NOMINAL.items() if k in name), float("nan"))
    emit(kind="roofline", copy_gbs=round(copy_gbs, 1), hbm_nominal_gbs=nominal, bf16_matmul_tflops=round(mm_tflops, 1))

    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=gen)

    def middle(tk: int, h: int, d: int) -> torch.Tensor:
        # the middle slice of a store with 4 sink and 256 local tokens
        return randn(1, tk + 260, h, d)[:, 4 : 4 + tk]

    def scope_case(model: str, tq: int, scope: int, t_store: int = 65536):
        hq, h, d = MODELS[model]
        sink, local = 4, max(256, tq)
        ns, local_start = scope - sink - local, t_store - local
        sel = torch.randperm(local_start - sink, device=dev)[:ns].sort().values.add(sink)[None]
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
        kw = {"sink_len": sink, "local_start": local_start, "inv_freq": inv_freq, "attention_scaling": 1.0}
        kw["scale"] = d**-0.5
        q, kst, vst = randn(1, tq, hq, d), randn(1, t_store, h, d), randn(1, t_store, h, d)
        return q, kst, vst, sel, torch.tensor([ns], device=dev), kw

    def graph(fn) -> dict:
        try:
            return {"graph_ms": round(timer.graph_ms(fn), 4)}
        except Exception as exc:  # noqa: BLE001  (a config that does not fit the chip is reported, not fatal)
            return {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}

    # tuning aid; the package's defaults (`_config` in each op) come from runs of this sweep
    for model, (hq, h, d) in MODELS.items():
        if "topk-prefill" in sweep:
            for tq, tk in ((2048, 131072), (512, 32768)):
                k, q = middle(tk, h, d), randn(1, tq, hq, d)
                for cfg in ((64, 128, 4, 3), (32, 128, 4, 3), (64, 256, 4, 3), (64, 128, 4, 4), (64, 128, 8, 3)):
                    t = graph(partial(score_topk_fwd, q, k, 8, config=cfg))
                    tf = {"TFLOPs": round(2 * tq * hq * tk * d / t["graph_ms"] / 1e9, 1)} if "graph_ms" in t else {}
                    emit(kind="sweep_topk_prefill", model=model, TQ=tq, TK=tk, config=cfg, **t, **tf)
        if "topk-decode" in sweep:
            # decode: the default (None) and 1, 3 and 4 programs per SM; top-k as the model's preset has it
            top_k = 4 if h == 3 else 8
            split_counts = (None, *(triton.cdiv(n * meta["sms"], h) for n in (1, 3, 4)))
            for tk in (131072, 1048576):
                k, q = middle(tk, h, d), randn(1, 1, hq, d)
                for cfg in ((16, 128, 4, 3), (16, 128, 4, 4), (16, 128, 4, 5), (16, 256, 4, 3), (16, 256, 8, 3),
                            (16, 64, 4, 4), (16, 128, 8, 4), (16, 128, 2, 3)):  # fmt: skip
                    for splits in split_counts:
                        t = graph(partial(score_topk_fwd, q, k, top_k, config=cfg, splits=splits))
                        bw = {"GBps": round(tk * h * d * 2 / t["graph_ms"] / 1e6, 1)} if "graph_ms" in t else {}
                        emit(kind="sweep_topk_decode", model=model, TK=tk, top_k=top_k, config=cfg,
                             splits=splits or "auto", **t, **bw)  # fmt: skip
    if "attention" in sweep:
        # prefill chunks over a scope: the embedded preset's (256 queries, 1,312 positions: its sink was 32 then; the
        # shape is kept so that results compare across commits) and a Llama-8B-shaped
        # engine's default (512 queries, 16K positions); TFLOP/s counts the visible (query, key) pairs
        for model, tq, scope in (("SmolLM2-135M", 256, 1312), ("Llama-3.1-8B", 512, 16388)):
            hq, h, d = MODELS[model]
            q, kst, vst, sel, n_sel, kw = scope_case(model, tq, scope, t_store=65536)
            pairs = tq * (scope - tq) + tq * (tq + 1) // 2
            for cfg in (None, (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2),
                        (128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2), (64, 64, 8, 3)):  # fmt: skip
                t = graph(partial(scope_attention_fwd, q, kst, vst, sel, n_sel, config=cfg, **kw))
                tf = {"TFLOPs": round(4 * pairs * hq * d / t["graph_ms"] / 1e9, 1)} if "graph_ms" in t else {}
                emit(kind="sweep_scope_prefill", model=model, TQ=tq, scope=scope, config=cfg or "default", **t, **tf)
    if "attention-decode" in sweep:
        # one query token over a scope of each preset's size (the embedded model's 1,344 positions, Llama-8B's
        # 8,192), split as the package splits it; (16, 128, 4, 2), the default, spills registers at both head
        # dims on sm_90 (benchmarks/kernel_resources.py), 64-key tiles and 8 warps do not
        for model, scope in (("SmolLM2-135M", 1344), ("Llama-3.1-8B", 8192)):
            hq, h, d = MODELS[model]
            q, kst, vst, sel, n_sel, kw = scope_case(model, 1, scope, t_store=65536)
            for cfg in (None, (16, 64, 4, 2), (16, 64, 4, 3), (16, 32, 4, 2), (16, 128, 8, 2), (16, 64, 8, 2),
                        (16, 64, 2, 2)):  # fmt: skip
                t = graph(partial(scope_attention_fwd, q, kst, vst, sel, n_sel, config=cfg, **kw))
                bw = {"kv_GBps": round(2 * scope * h * d * 2 / t["graph_ms"] / 1e6, 1)} if "graph_ms" in t else {}
                emit(kind="sweep_scope_decode", model=model, scope=scope, config=cfg or "default", **t, **bw)
    if args.sweep_only:
        return

    # (a) scoring, decode
    for model, (hq, h, d) in MODELS.items():
        for tk in (131072, 1048576):
            k, q = middle(tk, h, d), randn(1, 1, hq, d)
            t = timer.all(partial(score_topk_fwd, q, k, 8))
            gbs = tk * h * d * 2 / t["graph_ms"] / 1e6
            emit(
                kind="score_topk_decode", model=model, TQ=1, TK=tk, HQ=hq, H=h, D=d, top_k=8, **t,
                GBps=round(gbs, 1), pct_copy=round(100 * gbs / copy_gbs, 1), pct_nominal=round(100 * gbs / nominal, 1),
            )  # fmt: skip

    # (b) scoring, prefill: the default two phases against one pass, on the same inputs
    shapes = [(m, tk, tq, 8) for m in MODELS for tk in (32768, 131072) for tq in (512, 1024, 2048)]
    # the embedded model's preset: prefill chunks of 256, top-4, to a 1M-token middle
    shapes += [("SmolLM2-135M", tk, 256, 4) for tk in (131072, 1048576)]
    for model, tk, tq, top_k in shapes:
        hq, h, d = MODELS[model]
        k, q = middle(tk, h, d), randn(1, tq, hq, d)
        for phases in (2, 1):
            t = timer.all(partial(score_topk_fwd, q, k, top_k, two_phase=phases == 2), host=False)
            tflops = 2 * tq * hq * tk * d / t["graph_ms"] / 1e9
            emit(
                kind="score_topk_prefill", model=model, TQ=tq, TK=tk, HQ=hq, H=h, D=d, top_k=top_k, phases=phases,
                **t, TFLOPs=round(tflops, 1), pct_matmul=round(100 * tflops / mm_tflops, 1),
            )  # fmt: skip
        del k, q

    # (c) scope attention vs SDPA on a gathered, rotated scope, and vs the unfused torch pipeline
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    for model, (hq, h, d) in MODELS.items():
        for tq in (1, 512):
            for scope in (1312, 8196):
                q, kst, vst, sel, n_sel, kw = scope_case(model, tq, scope)
                mask = causal_lower_right(tq, scope) if tq > 1 else None
                unfused = partial(gather_rotate_sdpa, q, kst, vst, sel, kw, mask)
                with torch.no_grad():
                    qg, kg, vg = (x.contiguous() for x in gather_rotate(q, kst, vst, sel, kw))
                t = timer.all(partial(scope_attention_fwd, q, kst, vst, sel, n_sel, **kw))
                t_sdpa = timer.graph_ms(partial(sdpa, qg, kg, vg, attn_mask=mask, scale=kw["scale"]))
                t_unf = timer.graph_ms(unfused)
                pairs = tq * (scope - tq) + tq * (tq + 1) // 2  # visible (query, key) pairs
                emit(
                    kind="scope_attention", model=model, TQ=tq, L=scope, HQ=hq, H=h, D=d, **t,
                    sdpa_gathered_ms=round(t_sdpa, 4), unfused_torch_ms=round(t_unf, 4),
                    vs_sdpa=round(t_sdpa / t["graph_ms"], 2), vs_unfused=round(t_unf / t["graph_ms"], 2),
                    TFLOPs=round(4 * hq * d * pairs / t["graph_ms"] / 1e9, 1),
                    kv_GBps=round(2 * scope * h * d * 2 / t["graph_ms"] / 1e6, 1),
                )  # fmt: skip

    (out / f"kernels-{tag}.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


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
        f"torch {meta['torch']}, triton {meta['triton']}, git {meta['git']}, {meta['sms']} SMs; bf16, top-8 unless a column says otherwise.",
        "",
        (
            "`graph ms`: median GPU time of a CUDA-graph replay, L2 flushed before each (kernel time); "
            "`eager ms`: `triton.testing.do_bench` median of the eager call (includes host launch gaps); "
            "`host us`: host time of one eager call. Rates use the graph time."
        ),
        "",
        (
            f"Rooflines measured in the same run: device-to-device copy {roof['copy_gbs']} GB/s (read + write), "
            f"nominal HBM {roof['hbm_nominal_gbs']} GB/s; dense bf16 matmul (8192^3) "
            f"{roof['bf16_matmul_tflops']} TFLOP/s."
        ),
        "",
        "## Scoring, decode (1 query; GB/s = key bytes read / time)",
        "",
        "| model | TK | graph ms | eager ms | host us | GB/s | % of copy | % of nominal HBM |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "score_topk_decode":
            lines.append(
                f"| {r['model']} | {r['TK']} | {r['graph_ms']} | {r['eager_ms']} | {r['host_us']} | {r['GBps']} "
                f"| {r['pct_copy']} | {r['pct_nominal']} |"
            )
    lines += [
        "",
        "## Scoring, prefill (TFLOP/s = 2 TQ HQ TK D / time)",
        "",
        "| model | TQ | TK | top-k | phases | graph ms | eager ms | TFLOP/s | % of bf16 matmul |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "score_topk_prefill":
            lines.append(
                f"| {r['model']} | {r['TQ']} | {r['TK']} | {r['top_k']} | {r['phases']} | {r['graph_ms']} "
                f"| {r['eager_ms']} | {r['TFLOPs']} "
                f"| {r['pct_matmul']} |"
            )
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
            lines.append(
                f"| {r['model']} | {r['TQ']} | {r['L']} | {r['graph_ms']} | {r['eager_ms']} | {r['host_us']} "
                f"| {r['sdpa_gathered_ms']} | {r['unfused_torch_ms']} | {r['vs_sdpa']} | {r['vs_unfused']} "
                f"| {r['TFLOPs']} | {r['kv_GBps']} |"
            )
    lines.append("")
    lines.append("`vs` columns: baseline time / Triton time (> 1 means the Triton op is faster).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
