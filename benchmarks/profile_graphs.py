"""Where the GPU time of graphed prefill chunks and decode steps goes, kernel by kernel.

`bench_engine.py` gives the totals (128K prefill 9.3 s, 1M decode 8.5 ms); this says which kernels
make them, so that the next kernel change goes where the time is. It replays the engine's own
CUDA graphs (`reattention_core.cuda_graph.StepGraph`) under `torch.profiler` and sums each kernel's
device time per step.

    python3 benchmarks/profile_graphs.py $M --tokens 131072 --chunks 8 --steps 16 --out $OUT/graphs-128k.json
    python3 benchmarks/profile_graphs.py $M --tokens 1048576 --synthetic --out $OUT/graphs-1m.json
    python3 benchmarks/profile_graphs.py --model llama8b-random --tokens 131072 --synthetic --out $OUT/graphs-8b.json

The context before the profiled steps is either prefilled for real (random token ids, through the
prefill graph; the default) or, with ``--synthetic``, written straight into the KV store as random
keys and values (seconds instead of minutes at 1M). Kernel times barely depend on the data, except
the prefill scoring's second phase, which rescores only the key tiles that can still reach a row's
top-k: compare prefill rows of the two sources before trusting synthetic ones.

Per step it reports the wall time of plain replays (timed apart, without the profiler), the GPU's
busy time (the sum of its kernels' times in the trace) and the kernels grouped by name, largest first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import environment, key_read_floor, llama8b_random, sync
from profile_step import cuda_kernel_times

from reattention_core import ReAttentionCache, ReAttentionEngine
from reattention_core.cuda_graph import StepGraph
from reattention_core.prefill import run_prefill


def fill_synthetic(
    store: object, model: torch.nn.Module, tokens: int, device: torch.device, dtype: torch.dtype
) -> None:
    """Write ``tokens`` random pre-RoPE keys and values into every layer of ``store``."""
    cfg = model.config
    heads = cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn((1, tokens, heads, dim), generator=gen, device=device, dtype=dtype)
        store.extend(layer, k, torch.randn_like(k), device=device, dtype=dtype)
        del k


def replay_ms(graph: StepGraph, make_ids, steps: int) -> float:
    """Wall milliseconds per replayed step (after the graph is recorded)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.step(make_ids())
    sync()
    return (time.perf_counter() - t0) / steps * 1000


def profiled(graph: StepGraph, make_ids, steps: int, top: int) -> dict:
    """GPU time per step, in total and per kernel name, over ``steps`` replays under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            graph.step(make_ids())
        sync()
    per_kernel, launches = cuda_kernel_times(trace, name=lambda raw: raw.split("(")[0][:100])
    busy = sum(per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    return {
        "busy_ms": round(busy / steps / 1000, 4),
        "kernels_per_step": round(sum(launches.values()) / steps, 1),
        "kernels": [
            {
                "name": n,
                "ms": round(us / steps / 1000, 4),
                "share": round(us / busy, 4),
                "per_step": launches[n] / steps,
            }
            for n, us in ranked[:top]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model directory (default: the embedded SmolLM2-135M), or llama8b-random (Llama-3.1-8B "
                    "shapes, random bf16 weights)")  # fmt: skip
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--tokens", type=int, default=131072, help="context before the profiled steps")
    ap.add_argument("--chunks", type=int, default=8, help="prefill chunks profiled (0: none)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps profiled (0: none)")
    ap.add_argument("--synthetic", action="store_true", help="random keys/values instead of a real prefill")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per phase")
    ap.add_argument("--compile", action="store_true", help="decoder layers compiled (compile_model=True)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("this profiles CUDA graphs: it needs a GPU")

    if args.model == "llama8b-random":
        engine = llama8b_random("cuda")
    else:
        engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file, cache=False)
    model, cfg = engine.model, engine.config
    chunk = cfg.prefill_chunk_size
    param = next(model.parameters())
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def random_ids(n: int) -> torch.Tensor:
        """``[1, n]`` random token ids on the model's device (the same stream for context and steps)."""
        return torch.randint(100, vocab - 100, (1, n), generator=gen).to(param.device)

    head = args.tokens - (args.chunks + 1) * chunk if args.chunks else args.tokens
    max_length = args.tokens + args.steps + 2
    row: dict = {
        "bench": "profile_graphs",
        "model": engine.model_name,
        "tokens": args.tokens,
        "source": "synthetic" if args.synthetic else "prefill",
        "compiled_layers": args.compile,
        **environment(),
    }
    engine.compile_model = args.compile
    with torch.inference_mode(), engine._running(cfg):  # under ReAttention, compiled with --compile
        store = engine._fresh_store(max_length)
        cache = ReAttentionCache(store)
        t0 = time.perf_counter()
        if args.synthetic:
            fill_synthetic(store, model, head, param.device, param.dtype)
        else:
            run_prefill(
                model,
                random_ids(head),
                cache,
                chunk,
                last_alone=False,
                progress=True,
                graph=engine._prefill_graph(cache, head, max_length),
            )
        sync()
        row["context_s"] = round(time.perf_counter() - t0, 2)
        if args.chunks:
            graph = StepGraph(model, cache, cfg, max_length, tokens=chunk)
            chunk_ids = partial(random_ids, chunk)
            graph.step(chunk_ids())  # records
            half = args.chunks // 2
            row["prefill"] = {
                "chunk_tokens": chunk,
                "at_tokens": store.min_length(),
                "wall_ms": round(replay_ms(graph, chunk_ids, max(1, half)), 4),
                **profiled(graph, chunk_ids, max(1, args.chunks - half), args.top),
            }
            del graph
        if args.steps:
            graph = StepGraph(model, cache, cfg, max_length, tokens=1)
            token = partial(random_ids, 1)
            graph.step(token())  # records
            half = args.steps // 2
            row["decode"] = {
                "at_tokens": store.min_length(),
                "wall_ms": round(replay_ms(graph, token, max(1, half)), 4),
                **profiled(graph, token, max(1, args.steps - half), args.top),
                **key_read_floor(store, cfg, store.min_length()),
            }
    for phase in ("prefill", "decode"):
        if phase in row:
            p = row[phase]
            print(
                f"{phase}: {p['wall_ms']} ms/step wall, GPU busy {p['busy_ms']} ms, {p['kernels_per_step']} kernels/step"
                + (f", key-read floor {p['key_read_floor_ms']:.3f} ms" if "key_read_floor_ms" in p else "")
            )
            for k in p["kernels"]:
                print(f"  {k['ms']:9.4f} ms {k['share']:6.1%} x{k['per_step']:<5g} {k['name']}")
    if args.out:
        args.out.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
