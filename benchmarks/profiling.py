"""Where the time goes: GPU time per kernel of graphed steps, host time of the kernel calls, host time of a step.

    python3 benchmarks/profiling.py graphs $M --tokens 131072 --chunks 8 --steps 16 --out $OUT/graphs-128k.json
    python3 benchmarks/profiling.py graphs --model llama8b-random --tokens 131072 --synthetic --compile --out ...
    python3 benchmarks/profiling.py host --out $OUT/host.json
    python3 benchmarks/profiling.py step $M --tokens 131072 --steps 64 --out $OUT/step.json

``graphs`` replays the engine's own CUDA graphs (a prefill chunk, a decode step; `StepGraph`) under
`torch.profiler` and sums each kernel's device time per step. The context before them is prefilled for
real (random ids) or, with ``--synthetic``, written into the store as random keys and values (seconds
instead of minutes at 1M; prefill scoring's phase 2 depends on the data, so compare before trusting
synthetic prefill rows). ``--model`` also takes ``llama8b-random`` and ``qwen1.5b-random``.

``host`` times the eager host cost of the kernel ops at the embedded model's shapes (one query, 128K keys):
`score_topk`, `select_blocks` with the fused selection and with the torch reference, `scope_attention`,
an empty Triton launch of as many arguments, and prints a cProfile of each.

``step`` profiles whole eager decode steps of the engine (the model's layers through transformers, the
cache, selection, scope attention) and groups the host time by package; on CUDA it adds the GPU's busy time.

(The file is not called ``profile.py``: that would shadow the standard library's ``profile``, which
``cProfile`` and ``torch._dynamo`` import, for every script run from this folder.)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import RANDOM_MODELS, environment, key_read_floor, sync
from bench_kernels import cuda_kernel_times

from reattention_core import ReAttentionCache, ReAttentionEngine
from reattention_core.generation.cuda_graph import StepGraph
from reattention_core.generation.prefill import run_prefill


def load(model: str | None, gguf_file: str | None) -> ReAttentionEngine:
    if model in RANDOM_MODELS:
        return RANDOM_MODELS[model]("cuda")
    return ReAttentionEngine.from_pretrained(model, gguf_file=gguf_file, cache=False)


# -- graphs ------------------------------------------------------------------------------------------


def fill_synthetic(store, model: torch.nn.Module, tokens: int, device: torch.device, dtype: torch.dtype) -> None:
    """Write ``tokens`` random pre-RoPE keys and values into every layer of ``store``."""
    cfg = model.config
    heads = cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn((1, tokens, heads, dim), generator=gen, device=device, dtype=dtype)
        store.extend(layer, k, torch.randn_like(k), device=device, dtype=dtype)
        del k


def replayed(graph: StepGraph, make_ids, steps: int, top: int) -> dict:
    """Wall ms per plain replay, then GPU time per step, in total and per kernel, under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    half = max(1, steps // 2)
    sync()
    t0 = time.perf_counter()
    for _ in range(half):
        graph.step(make_ids())
    sync()
    wall = (time.perf_counter() - t0) / half * 1000
    n = max(1, steps - half)
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(n):
            graph.step(make_ids())
        sync()
    per_kernel, launches = cuda_kernel_times(trace, name=lambda raw: raw.split("(")[0][:100])
    busy = sum(per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    kernels = [{"name": k, "ms": round(us / n / 1000, 4), "share": round(us / busy, 4), "per_step": launches[k] / n}
               for k, us in ranked]  # fmt: skip
    return {"wall_ms": round(wall, 4), "busy_ms": round(busy / n / 1000, 4),
            "kernels_per_step": round(sum(launches.values()) / n, 1), "kernels": kernels}  # fmt: skip


def graphs(args: argparse.Namespace) -> dict:
    engine = load(args.model, args.gguf_file)
    model, cfg = engine.model, engine.config
    chunk = cfg.prefill_chunk_size
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)

    def random_ids(n: int) -> torch.Tensor:
        vocab = model.config.vocab_size
        return torch.randint(100, vocab - 100, (1, n), generator=gen).to(param.device)

    head = args.tokens - (args.chunks + 1) * chunk if args.chunks else args.tokens
    max_length = args.tokens + args.steps + 2
    row: dict = {"bench": "profile_graphs", "model": engine.model_name, "tokens": args.tokens,
                 "source": "synthetic" if args.synthetic else "prefill", "compiled_layers": args.compile}  # fmt: skip
    engine.compile_model = args.compile
    with torch.inference_mode(), engine._runner.running(engine._settings()):
        store = engine._runner.fresh_store(max_length)
        cache = ReAttentionCache(store)
        t0 = time.perf_counter()
        if args.synthetic:
            fill_synthetic(store, model, head, param.device, param.dtype)
        else:
            run_prefill(model, random_ids(head), cache, chunk, last_alone=False, progress=True,
                        graph=engine._graphs().prefill(cache, head, max_length))  # fmt: skip
        sync()
        row["context_s"] = round(time.perf_counter() - t0, 2)
        for phase, tokens, steps in (("prefill", chunk, args.chunks), ("decode", 1, args.steps)):
            if not steps:
                continue
            graph = StepGraph(model, cache, cfg, max_length, tokens=tokens)
            make = partial(random_ids, tokens)
            graph.step(make())  # records
            row[phase] = {"at_tokens": store.min_length(), **replayed(graph, make, steps, args.top)}
            if phase == "decode":
                row[phase].update(key_read_floor(store, cfg, store.min_length()))
            del graph
    for phase in ("prefill", "decode"):
        if phase in row:
            p = row[phase]
            print(f"{phase}: {p['wall_ms']} ms/step wall, GPU busy {p['busy_ms']} ms, {p['kernels_per_step']} kernels")
            for k in p["kernels"]:
                print(f"  {k['ms']:9.4f} ms {k['share']:6.1%} x{k['per_step']:<5g} {k['name']}")
    return row


# -- host --------------------------------------------------------------------------------------------


def host_us(fn, n: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    sync()
    return host / n * 1e6


def cprofile_text(fn, n: int, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    sync()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


@triton.jit
def _empty(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13,
           i14, i15, i16, i17, i18, i19, i20, f0, X: tl.constexpr, Y: tl.constexpr):  # fmt: skip
    """A launch of as many arguments as the scoring kernel's, doing nothing: the launch floor."""


def host(args: argparse.Namespace) -> dict:
    from reattention_core.attention.selection import select_blocks
    from reattention_kernels import KernelOptions, scope_attention, score_topk

    dev, dt = torch.device("cuda"), torch.bfloat16
    hq, h, d, t = 9, 3, 64, args.keys
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 1, hq, d, device=dev, dtype=dt, generator=g)
    k = torch.randn(1, t, h, d, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, t, h, d, device=dev, dtype=dt, generator=g)
    inv_freq = 1.0 / (1e5 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    sink, local = 64, 256
    middle = k[:, sink : t - local]
    kw = {"top_k": 4, "max_blocks": 32, "block_size": 32}
    sel, n_sel = select_blocks(q, middle, offset=sink, **kw)
    a = torch.empty(16, device=dev)
    reference_selection = KernelOptions(triton_selection=False)
    calls = {
        "score_topk": lambda: score_topk(q, middle, 4),
        "select_blocks (fused selection kernel)": lambda: select_blocks(q, middle, **kw),
        "select_blocks (torch reference selection)": partial(select_blocks, q, middle,
                                                             kernel_options=reference_selection, **kw),
        "scope_attention": lambda: scope_attention(q, k, v, sel, n_sel, sink_len=sink, local_start=t - local,
                                                   inv_freq=inv_freq, attention_scaling=1.0, scale=d**-0.5),
        "empty Triton kernel, 33 arguments": lambda: _empty[(1,)](*([a] * 11), *range(7, 28), 0.5, X=1, Y=2),
        "torch add (one launch)": lambda: a.add_(1),
    }  # fmt: skip
    row = {"bench": "profile_host", "shape": {"TQ": 1, "HQ": hq, "H": h, "D": d, "T": t}, "host_us": {}}
    for name, fn in calls.items():
        row["host_us"][name] = round(host_us(fn, args.calls), 1)
        print(f"{name}: {row['host_us'][name]} us", flush=True)
    for name in list(calls)[1:4]:
        row.setdefault("profiles", {})[name] = text = cprofile_text(calls[name], 200, args.top)
        print(f"\n=== {name} (200 calls) ===\n{text}", flush=True)
    return row


# -- step --------------------------------------------------------------------------------------------

_GROUPS = (
    ("reattention_kernels", ("/kernels/", "reattention_kernels")),
    ("reattention_core", ("reattention_core",)),
    ("transformers", ("transformers",)),
    ("triton", ("triton",)),
    ("torch", ("torch",)),
)


def group_of(filename: str) -> str:
    """The package a profiled function's file belongs to (``"builtin"`` for C functions)."""
    if filename == "~" or filename.startswith("<"):
        return "builtin"
    return next((name for name, marks in _GROUPS if any(m in filename for m in marks)), "other")


def decode_steps(model: torch.nn.Module, cache: ReAttentionCache, token: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    return token


def step(args: argparse.Namespace) -> dict:
    engine = load(args.model, args.gguf_file)
    model, cfg = engine.model, engine.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.tokens), generator=gen)
    with torch.inference_mode(), engine._runner.running(engine._settings()):
        store = engine._runner.fresh_store(args.tokens + 3 * args.steps + 2)
        cache = ReAttentionCache(store)
        logits = run_prefill(model, ids.to(engine.device), cache, cfg.prefill_chunk_size)
        last = logits[:, -1] if logits.dim() == 3 else logits
        token = decode_steps(model, cache, last.argmax(-1, keepdim=True), 1)
        sync()
        t0 = time.perf_counter()
        token = decode_steps(model, cache, token, args.steps)
        sync()
        wall_ms = (time.perf_counter() - t0) / args.steps * 1000
        prof = cProfile.Profile()
        prof.enable()
        token = decode_steps(model, cache, token, args.steps)
        sync()
        prof.disable()
        gpu = None
        if engine.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as trace:
                decode_steps(model, cache, token, args.steps)
                sync()
            per_kernel, _ = cuda_kernel_times(trace)
            top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
            gpu = {"busy_ms_per_step": round(sum(per_kernel.values()) / args.steps / 1000, 3),
                   "top_kernels_ms_per_step": {n[:90]: round(us / args.steps / 1000, 4) for n, us in top}}  # fmt: skip
    stats = pstats.Stats(prof)
    by_group: dict[str, float] = defaultdict(float)
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_group[group_of(filename)] += tottime
    total = sum(by_group.values())
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    row = {"bench": "profile_step", "model": engine.model_name, "tokens": args.tokens, "steps": args.steps,
           "decode_ms_per_step": round(wall_ms, 3), "profiled_ms_per_step": round(total / args.steps * 1000, 3),
           "own_time_share": {k: round(v / total, 4) for k, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
           "top_functions": buf.getvalue(), "gpu": gpu}  # fmt: skip
    print(f"decode {row['decode_ms_per_step']} ms/step; under cProfile {row['profiled_ms_per_step']} ms/step, "
          f"own time by package: {row['own_time_share']}\n{row['top_functions']}")  # fmt: skip
    if gpu is not None:
        print(f"GPU busy {gpu['busy_ms_per_step']} ms/step; top kernels: {gpu['top_kernels_ms_per_step']}")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("graphs", "host", "step"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, default=None)
        p.add_argument("--top", type=int, default=25, help="kernels or functions listed")
        if name != "host":
            p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M), "
                           f"or one of {sorted(RANDOM_MODELS)} (random bf16 weights)")  # fmt: skip
            p.add_argument("--gguf-file", default=None)
            p.add_argument("--tokens", type=int, default=131072, help="context before the profiled steps")
    sub.choices["graphs"].add_argument("--chunks", type=int, default=8, help="prefill chunks profiled (0: none)")
    sub.choices["graphs"].add_argument("--steps", type=int, default=16, help="decode steps profiled (0: none)")
    sub.choices["graphs"].add_argument("--synthetic", action="store_true", help="random keys/values, no prefill")
    sub.choices["graphs"].add_argument("--compile", action="store_true", help="compiled decoder layers")
    sub.choices["host"].add_argument("--keys", type=int, default=131072)
    sub.choices["host"].add_argument("--calls", type=int, default=500)
    sub.choices["step"].add_argument("--steps", type=int, default=32, help="decode steps timed, then as many profiled")
    args = ap.parse_args(argv)
    if args.what != "step" and not torch.cuda.is_available():
        ap.error(f"{args.what} needs a GPU")
    row = {"graphs": graphs, "host": host, "step": step}[args.what](args)
    row.update(environment())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
