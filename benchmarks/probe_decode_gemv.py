"""Time a decode step's projections (one token) as cuBLAS GEMMs and as reductions Inductor writes.

    python benchmarks/probe_decode_gemv.py [--layers 30] [--out FILE]

A decode step multiplies one row by each projection matrix: at the embedded model's sizes a few MB
per GEMM, so cuBLAS's kernel takes 3.7-4 us where reading the weights once takes under 1 us
(`profile_graphs.py` at 1M tokens on an H200: 120 GEMMs, 0.47 ms of a 4.7 ms step). Written as a
multiply and a sum, the same product is a row reduction that Inductor compiles into one Triton kernel,
and fuses with its neighbours (the residual add after ``o_proj`` and ``down_proj``).

The probe builds the projection chain of ``--layers`` decoder layers (random weights, fresh per layer,
so nothing stays in the L2 across layers): ``qkv`` (q/k/v fused), ``o_proj`` + residual, ``gate_up``
(fused), SiLU x up, ``down_proj`` + residual, without norms or attention. It compiles that chain
three ways and replays each as a CUDA graph, timing replays with the L2 flushed and summing kernel
times under `torch.profiler`:

* ``linear``: ``F.linear`` everywhere (Inductor calls cuBLAS, as the engine's compiled layers do now);
* ``reduce``: every projection as ``(x.float() * W.float()).sum(-1)`` cast back;
* ``reduce-split``: the same, with gate and up as two reductions (Inductor may fuse them and the SiLU).

Outputs of the three are compared (bf16; the sums' orders differ; with 30 layers of random weights the
embedded shapes overflow to inf, so only Llama's 4 layers give a number). One JSON line per model shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import environment
from bench_kernels import capture_graph, replay_ms
from profile_step import cuda_kernel_times

# hidden, q/k/v out features, intermediate
SHAPES = {"SmolLM2-135M": (576, 576 + 2 * 192, 1536), "Llama-3.1-8B": (4096, 4096 + 2 * 1024, 14336)}


def rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float().unsqueeze(-2) * w.float()).sum(-1).to(x.dtype)


def chain(x: torch.Tensor, *, layers: list[dict[str, torch.Tensor]], how: str, hidden: int, inter: int) -> torch.Tensor:
    lin = F.linear if how == "linear" else rows
    for w in layers:
        qkv = lin(x, w["qkv"])
        h = x + lin(qkv[..., :hidden], w["o"])
        if how == "reduce-split":
            g, u = lin(h, w["gate_up"][:inter]), lin(h, w["gate_up"][inter:])
        else:
            g, u = lin(h, w["gate_up"]).split(inter, dim=-1)
        x = h + lin(F.silu(g) * u, w["down"])
    return x


def timed(
    layers: list[dict[str, torch.Tensor]], x: torch.Tensor, how: str, flush: torch.Tensor
) -> tuple[dict, torch.Tensor]:
    """One compiled chain as a CUDA graph: replay and kernel times per layer, and its output."""
    from torch.profiler import ProfilerActivity, profile

    hidden, inter = x.shape[-1], layers[0]["down"].shape[1]
    torch._dynamo.reset()
    fn = torch.compile(partial(chain, layers=layers, how=how, hidden=hidden, inter=inter))
    out = torch.empty_like(x)
    graph = capture_graph(lambda: out.copy_(fn(x)))
    ms = replay_ms(graph, 50, flush)
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(10):
            flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    times, launches = cuda_kernel_times(trace, name=lambda raw: raw[:70])
    kern = {k: v for k, v in times.items() if "fill" not in k.lower() and "FillFunctor" not in k}
    n = len(layers) * 10
    return {
        "replay_us_per_layer": round(ms * 1000 / len(layers), 2),
        "kernel_us_per_layer": round(sum(kern.values()) / n, 2),
        "kernels_per_layer": round(sum(launches[k] for k in kern) / n, 2),
        "top": {k: round(v / n, 2) for k, v in sorted(kern.items(), key=lambda kv: -kv[1])[:6]},
    }, out.float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for model in args.models:
        hidden, qkv_out, inter = SHAPES[model]
        n_layers = args.layers if model == "SmolLM2-135M" else min(args.layers, 4)
        gen = torch.Generator(device="cuda").manual_seed(0)
        shapes = {
            "qkv": (qkv_out, hidden),
            "o": (hidden, hidden),
            "gate_up": (2 * inter, hidden),
            "down": (hidden, inter),
        }
        layers = [
            {name: (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)
             for name, (n, k) in shapes.items()}
            for _ in range(n_layers)
        ]  # fmt: skip
        x = torch.randn(1, 1, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        row = {"model": model, "layers": n_layers, **environment()}
        outs = {}
        for how in ("linear", "reduce", "reduce-split"):
            row[how], outs[how] = timed(layers, x, how, flush)
        ref = outs["linear"]
        row["max_rel_diff"] = {h: float((o - ref).abs().max() / ref.abs().max()) for h, o in outs.items()}
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
