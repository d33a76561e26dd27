"""End-to-end speed and memory: prefill time and decode ms/token against context length.

Modes:
  reattention  the engine with its configured scope (chunked prefill, selection per chunk/step)
  full         the engine with mode="full": same chunked path, plain attention over every token
  hf           vanilla Hugging Face (SDPA, DynamicCache), one-shot prefill: the external baseline

    python benchmarks/bench_engine.py --tokens 4096 16384 --modes reattention full hf \
        --out benchmarks/results/engine-cpu.jsonl

Stores (``--stores``, each timed in turn): ``resident`` (the KV store on the GPU), ``values`` (keys
on the GPU, values in pinned host memory: `OffloadConfig(keys="device")`), ``host`` (both in host
memory, per-block key bounds on the GPU; ``--offload-budget/--offload-block/--offload-approximate``).

``--fuse off layers`` (each timed in turn): ``layers`` is the engine's ``compile_model=True``
(each whole decoder layer compiled with ``torch.compile``; see `reattention_core.hf.compiled`).

``--select default histogram`` and ``--epilogues off on`` (Triton kernels only) set the engine's
`KernelOptions`: a decode step selects in one program (``default``) or through the histogram path of
prefill chunks (``small_selection=False``); its split kernels merge (and select) in their last program
(``on``: ``fuse_decode_selection`` and ``fuse_decode_merge``) or in kernels of their own (``off``, the
default). Each ``--select`` is timed in turn; the ``--epilogues`` settings share one prefill (run with
the first) and each times its own decode steps after it.

Models: the embedded SmolLM2-135M (default), ``--model llama8b-random`` (Llama-3.1-8B shapes) or
``qwen1.5b-random`` (Qwen2.5-Coder-1.5B shapes: 28 layers, 12 / 2 heads of dim 128), random bf16
weights, GPU only; or a model directory. Prompts are random token ids: speed does not depend on the
text. Every row records device, versions and commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import transformers

from reattention_core import ReAttentionCache, ReAttentionConfig, ReAttentionEngine, StoreMemoryError
from reattention_core.evaluation.cli import parse_overrides
from reattention_core.generation.cuda_graph import GraphPolicy
from reattention_core.generation.loop import ModelSteps
from reattention_core.generation.prefill import run_prefill
from reattention_core.store.offloaded import OffloadConfig, OffloadedStore
from reattention_kernels import KernelOptions

STORES = ("resident", "values", "host")


def llama8b_random(device: str) -> ReAttentionEngine:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation_internal = "sdpa"
    return ReAttentionEngine(model, tokenizer=None, model_name="llama-3.1-8b-shaped-random")


def qwen15b_random(device: str) -> ReAttentionEngine:
    """Qwen2.5-Coder-1.5B's shapes (its config.json), random bf16 weights: 28 layers, 12 query and 2 KV
    heads of dim 128, a 32K pre-training window (the engine's config: `ReAttentionConfig.for_window`)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )  # fmt: skip
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation_internal = "sdpa"
    return ReAttentionEngine(model, tokenizer=None, model_name="qwen2.5-coder-1.5b-shaped-random")


RANDOM_MODELS = {"llama8b-random": llama8b_random, "qwen1.5b-random": qwen15b_random}


def kernel_options(base: KernelOptions, select: str, epilogues: str) -> KernelOptions:
    """``base`` with the decode step's selection path and epilogues of ``--select`` and ``--epilogues``."""
    fuse = epilogues == "on"
    return base.replace(small_selection=select == "default", fuse_decode_selection=fuse, fuse_decode_merge=fuse)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_engine(
    engine: ReAttentionEngine,
    cfg: ReAttentionConfig,
    ids: torch.Tensor,
    decode: int,
    progress: bool = False,
    graphs: bool = True,
    decode_options: list[KernelOptions] | None = None,
) -> list[dict]:
    """Prefill ``ids`` (with the engine's `KernelOptions`), then time ``decode`` greedy steps with each
    of ``decode_options`` in turn (default: the engine's), through the engine's CUDA graphs (where they
    apply) or without them: one row per options, sharing the prefill."""
    model = engine.model
    options = decode_options or [engine.kernel_options]
    max_length = ids.shape[1] + len(options) * (decode + 1) + 1
    rows = []
    with torch.inference_mode():
        with engine._runner.running(dataclasses.replace(engine._settings(), config=cfg)):  # compiled layers too
            # the engine's own store: on the device, or offloaded (--stores values | host)
            store = engine._runner.fresh_store(max_length)
            cache = ReAttentionCache(store)
            policy = GraphPolicy(model, cfg, engine.kernel_options)
            chunks = policy.prefill(cache, ids.shape[1], max_length) if graphs else None
            sync()
            t0 = time.perf_counter()
            logits = run_prefill(model, ids, cache, cfg.prefill_chunk_size, progress=progress, graph=chunks)
            sync()
            prefill = time.perf_counter() - t0
            prefill_graph = chunks is not None and chunks.replays > 0
            del chunks  # its memory pool goes before decoding
        for opts in options:
            engine.kernel_options = opts
            with engine._runner.running(dataclasses.replace(engine._settings(), config=cfg)):
                graph = GraphPolicy(model, cfg, opts).decode(cache, max_length, decode + 1) if graphs else None
                step_ms, logits = time_engine_decode(engine, cache, logits, decode, graph)
            row = {"prefill_s": prefill, "decode_ms_per_token": step_ms, "prefill_graph": prefill_graph,
                   "cuda_graph": graph is not None and graph.replays > 0, "kv_bytes": store.nbytes(),
                   "kv_host_bytes": store.nbytes("cpu") if engine.device.type == "cuda" else None}  # fmt: skip
            if isinstance(store, OffloadedStore) and store.bounds:  # the share of bounded blocks selections read
                row["offload_read_share"] = store.fetched_blocks / max(1, store.bounded_blocks)
            if cfg.mode != "full" and engine.device.type == "cuda":
                row.update(key_read_floor(store, cfg, ids.shape[1]))
                row["decode_over_floor"] = step_ms / row["key_read_floor_ms"]
            rows.append(row)
            del graph
    return rows


def time_engine_decode(
    engine: ReAttentionEngine, cache: object, logits: torch.Tensor, steps: int, graph
) -> tuple[float, torch.Tensor]:
    """Milliseconds per greedy decode step of the engine's own step (a CUDA graph when ``graph``),
    after one untimed step (which records the graph); and the last logits."""
    token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
    forward = ModelSteps(engine.model, cache, engine.config.prefill_chunk_size, decode_graph=graph)
    logits = forward.decode(token)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = forward.decode(int(logits[0].argmax()))
    sync()
    return (time.perf_counter() - t0) / max(1, steps) * 1000, logits


_COPY_GBPS: float | None = None


def best_gpu_s(fn, n: int = 10) -> float:
    """The shortest of ``n`` GPU times of ``fn()`` in seconds (CUDA events around each call)."""
    best = float("inf")
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return best


def hbm_copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read + written), best of 10, measured once."""
    global _COPY_GBPS
    if _COPY_GBPS is None:
        src = torch.empty(2**30, dtype=torch.int16, device="cuda")
        dst = torch.empty_like(src)
        _COPY_GBPS = 2 * src.numel() * src.element_size() / best_gpu_s(partial(dst.copy_, src)) / 1e9
        del src, dst
    return _COPY_GBPS


def key_read_floor(store: object, cfg: ReAttentionConfig, tokens: int) -> dict:
    """The decode goal's floor: time to read every layer's middle keys once at the copy bandwidth."""
    keys = store.view(0)[0]  # [B, T, H, D]
    middle = max(0, tokens - cfg.sink_size - cfg.local_window)
    nbytes = store.num_layers * keys.shape[0] * middle * keys.shape[2] * keys.shape[3] * keys.element_size()
    gbps = hbm_copy_bandwidth()
    return {"middle_key_bytes": nbytes, "hbm_copy_gbps": round(gbps, 1), "key_read_floor_ms": nbytes / gbps / 1e6}


def time_decode(model: torch.nn.Module, cache: object, logits: torch.Tensor, steps: int) -> float:
    """Milliseconds per greedy decode step (after one untimed step)."""
    token = logits[:, -1].argmax(-1, keepdim=True) if logits.dim() == 3 else logits.argmax(-1, keepdim=True)
    model(input_ids=token, past_key_values=cache, use_cache=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    return (time.perf_counter() - t0) / max(1, steps) * 1000


def run_hf(engine: ReAttentionEngine, ids: torch.Tensor, decode: int) -> dict:
    from transformers import DynamicCache

    model = engine.model
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync()
        prefill = time.perf_counter() - t0
        step_ms = time_decode(model, cache, out.logits, decode)
    return {"prefill_s": prefill, "decode_ms_per_token": step_ms}


def environment() -> dict:
    # REATTENTION_COMMIT names the commit where the tree has no .git (an exported copy on the GPU machine)
    commit = (
        os.environ.get("REATTENTION_COMMIT")
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "commit": commit or "unknown",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument(
        "--modes", nargs="+", default=["reattention", "full"], choices=["reattention", "full", "streaming", "hf"]
    )
    ap.add_argument("--decode", type=int, default=16, help="decode steps timed after prefill")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="override the config's prefill chunk")
    ap.add_argument("--backend", default=None, choices=["triton", "reference"])
    ap.add_argument("--progress", action="store_true", help="show a prefill progress bar (stderr)")
    ap.add_argument(
        "--stores",
        nargs="+",
        default=["resident"],
        choices=list(STORES),
        help="where the KV store lives: resident (GPU), values (keys on the GPU, values in pinned host "
        "memory), host (both in host memory, bounded blocks on the GPU); each is timed in turn",
    )
    ap.add_argument(
        "--offload-budget",
        type=int,
        default=64,
        metavar="BLOCKS",
        help="host store: bounded blocks read first per layer step",
    )
    ap.add_argument("--offload-block", type=int, default=64, metavar="TOKENS", help="host store: tokens per block")
    ap.add_argument(
        "--offload-approximate",
        action="store_true",
        help="host store: read only the budget (no refinement to the exact top-k)",
    )
    ap.add_argument(
        "--graphs",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="decode through a CUDA graph (on, where it applies) or eager steps (off); each is timed",
    )
    ap.add_argument(
        "--set",
        nargs="+",
        default=None,
        metavar="FIELD=INT",
        dest="overrides",
        help="ReAttention config fields to change, e.g. top_k=6 max_blocks=48 (as `reattention eval --set`)",
    )
    ap.add_argument(
        "--fuse",
        nargs="+",
        default=["off"],
        choices=["off", "layers"],
        help="off: the model as it is; layers: compile_model=True; each is timed",
    )
    ap.add_argument(
        "--select",
        nargs="+",
        default=["default"],
        choices=["default", "histogram"],
        help="decode-step selection: default (one kernel for few hits) or histogram (the path of "
        "prefill chunks); each is timed",
    )
    ap.add_argument(
        "--epilogues",
        nargs="+",
        default=["off"],
        choices=["on", "off"],
        help="decode steps' split kernels merge (and select) in their last program (on) or in kernels "
        "of their own (off, the default); each is timed",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.overrides)  # a bad field fails before the model loads

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model in RANDOM_MODELS:
        engine = RANDOM_MODELS[args.model](device)
    else:
        model = None if args.model == "embedded" else args.model
        engine = ReAttentionEngine.from_pretrained(model, gguf_file=args.gguf_file)
    base_options = KernelOptions(backend=args.backend)
    stores = {
        "resident": None,
        "values": OffloadConfig(keys="device"),
        "host": OffloadConfig(
            block=args.offload_block, budget=args.offload_budget, refine=not args.offload_approximate
        ),
    }
    base = engine.config
    if args.prefill_chunk:
        base = base.replace(prefill_chunk_size=args.prefill_chunk)
    if overrides:
        base = base.replace(**dict(overrides))
    env = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    vocab = engine.model.config.vocab_size
    # Compile every Triton kernel variant before anything is timed (a short run in each mode).
    # Long enough that prefill and decode go through their CUDA graphs too (their shifted kernels compile).
    chunk = base.prefill_chunk_size
    warm = base.sink_size + max(base.local_window, chunk) + 6 * chunk + 64
    warm_ids = torch.randint(100, vocab - 100, (1, warm)).to(engine.device)
    decode_options = {how: [kernel_options(base_options, how, ep) for ep in args.epilogues] for how in args.select}
    for mode in args.modes:
        for store in args.stores if mode != "hf" else ():
            engine.offload = stores[store]
            for graphs, fuse, how in itertools.product(args.graphs, args.fuse, args.select):
                engine.kernel_options, engine.compile_model = decode_options[how][0], fuse == "layers"
                run_engine(engine, base.replace(mode=mode), warm_ids, 5, graphs=graphs == "on",
                           decode_options=decode_options[how])  # fmt: skip
    runs = [("hf", "resident", "off", "off", "default")] if "hf" in args.modes else []
    runs = [r for m in args.modes if m != "hf"
            for r in itertools.product([m], args.stores, args.graphs, args.fuse, args.select)] + runs  # fmt: skip
    for tokens in args.tokens:
        gen = torch.Generator().manual_seed(tokens)
        ids = torch.randint(100, vocab - 100, (1, tokens), generator=gen).to(engine.device)
        for mode, store, graphs, fuse, how in runs:
            engine.offload = stores[store]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = {"model": engine.model_name, "tokens": tokens, "mode": mode, **env, "store": store}
            if overrides:
                row["overrides"] = ",".join(f"{k}={v}" for k, v in overrides)
            if how != "default":
                row["select"] = how
            if fuse != "off":
                row["fuse"] = "compiled decoder layers"
            if store == "host":
                row["offload"] = {"block": engine.offload.block, "budget": engine.offload.budget,
                                  "refine": engine.offload.refine}  # fmt: skip
            try:
                if mode == "hf":
                    results = [run_hf(engine, ids, args.decode)]
                else:
                    cfg = base.replace(mode=mode)
                    row["config"] = cfg.to_dict()
                    engine.kernel_options, engine.compile_model = decode_options[how][0], fuse == "layers"
                    results = run_engine(engine, cfg, ids, args.decode, args.progress, graphs == "on",
                                         decode_options=decode_options[how])  # fmt: skip
                    for result, ep in zip(results, args.epilogues, strict=False):
                        result["epilogues"] = ep
            except (torch.cuda.OutOfMemoryError, StoreMemoryError) as exc:  # full attention runs out first
                results = [{"error": f"out of memory: {str(exc).splitlines()[0]}"}]
            peak = {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}
            for result in results:
                full = {**row, **result, **peak}
                if "prefill_s" in full:
                    full["prefill_tok_per_s"] = tokens / full["prefill_s"]
                with args.out.open("a") as f:
                    f.write(json.dumps(full) + "\n")
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in full.items()
                         if k not in env and k != "config"}  # fmt: skip
                print(json.dumps(shown), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
