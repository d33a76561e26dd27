"""Where a whole decode step's host time goes: per package and per function (cProfile).

`profile_host.py` times the kernels' wrappers one by one; this profiles what a real decode step of
the engine runs (the model's 30 layers through Hugging Face, the cache update, selection, scope
attention, sampling), so that the next change (CUDA graphs, leaner glue) goes where the time is.

    python3 benchmarks/profile_step.py $M --tokens 131072 --steps 64 --out $OUT/step.json

It prefills ``--tokens`` random ids (not profiled), times ``--steps`` greedy decode steps (wall
ms per step, after one untimed step), then profiles as many again and groups the profile's own
time by where the code lives: this package, its kernels, transformers, torch, triton, other.
On CUDA it also traces as many steps with `torch.profiler` and reports the GPU's busy time per step
(the sum of kernel and copy times) beside the wall time: their gap is what the host costs.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import environment, sync  # noqa: E402

from reattention_core import ReAttentionCache, ReAttentionEngine, enable_reattention  # noqa: E402
from reattention_core.prefill import run_prefill  # noqa: E402

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
    for name, marks in _GROUPS:
        if any(m in filename for m in marks):
            return name
    return "other"


def decode_steps(model: torch.nn.Module, cache: ReAttentionCache, token: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return token


def cuda_kernel_times(trace, name=lambda raw: raw) -> tuple[dict[str, float], dict[str, int]]:
    """Device microseconds and launches per kernel of a `torch.profiler` trace, keyed by ``name(raw name)``."""
    times: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for ev in trace.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times[name(ev.name)] += ev.time_range.elapsed_us()
            launches[name(ev.name)] += 1
    return times, launches


def gpu_busy(model: torch.nn.Module, cache: ReAttentionCache, token: torch.Tensor, steps: int) -> dict:
    """GPU time per decode step from a `torch.profiler` trace: busy ms (kernels and copies) and the
    kernels that take most of it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        t0 = time.perf_counter()
        decode_steps(model, cache, token, steps)
        sync()
        wall = time.perf_counter() - t0
    per_kernel, _ = cuda_kernel_times(trace)
    busy_us = sum(per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {
        "busy_ms_per_step": round(busy_us / steps / 1000, 3),
        "traced_wall_ms_per_step": round(wall / steps * 1000, 3),
        "top_kernels_ms_per_step": {name[:90]: round(us / steps / 1000, 4) for name, us in top},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--tokens", type=int, default=8192, help="context prefilled before decoding")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed, then as many profiled")
    ap.add_argument("--top", type=int, default=30, help="functions listed")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file, cache=False)
    model, cfg = engine.model, engine.config
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 100, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(engine.device)
    with torch.inference_mode(), enable_reattention(model, cfg, backend=engine.backend):
        store = engine._fresh_store(args.tokens + 2 * args.steps + 2)
        cache = ReAttentionCache(store)
        logits = run_prefill(model, ids, cache, cfg.prefill_chunk_size)
        last = logits[:, -1] if logits.dim() == 3 else logits  # run_prefill may return the last row only
        token = decode_steps(model, cache, last.argmax(-1, keepdim=True), 1)
        sync()
        t0 = time.perf_counter()
        token = decode_steps(model, cache, token, args.steps)
        sync()
        wall_ms = (time.perf_counter() - t0) / args.steps * 1000
        prof = cProfile.Profile()
        prof.enable()
        decode_steps(model, cache, token, args.steps)
        sync()
        prof.disable()

        gpu = gpu_busy(model, cache, token, args.steps) if engine.device.type == "cuda" else None

    stats = pstats.Stats(prof)
    by_group: dict[str, float] = defaultdict(float)
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_group[group_of(filename)] += tottime
    total = sum(by_group.values())
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
    row = {
        "bench": "profile_step",
        "model": engine.model_name,
        "tokens": args.tokens,
        "steps": args.steps,
        **environment(),
        "decode_ms_per_step": round(wall_ms, 3),
        "profiled_ms_per_step": round(total / args.steps * 1000, 3),
        "own_time_share": {k: round(v / total, 4) for k, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "top_functions": buf.getvalue(),
        "gpu": gpu,
    }
    print(f"decode {row['decode_ms_per_step']} ms/step ({args.tokens} tokens of context); under the profiler "
          f"{row['profiled_ms_per_step']} ms/step, own time by package:")
    for name, share in row["own_time_share"].items():
        print(f"  {name:<20} {share:6.1%}")
    print(row["top_functions"])
    if gpu is not None:
        print(f"GPU busy {gpu['busy_ms_per_step']} ms/step of {gpu['traced_wall_ms_per_step']} ms wall; top kernels:")
        for name, ms in gpu["top_kernels_ms_per_step"].items():
            print(f"  {ms:8.3f} ms  {name}")
    if args.out:
        args.out.write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
