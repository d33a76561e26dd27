"""A pass-key prompt over a KV store sharded across GPUs: prefill seconds, decode ms/token, memory
per GPU, whether the key was found, and (``--check-single``) whether one GPU gives the same tokens.

Run one process per GPU under torchrun (NCCL); rank 0 writes one JSON line:

    torchrun --nproc-per-node 2 benchmarks/bench_sharded.py $M --tokens 262144 --check-single --out $OUT/sharded.jsonl

The prompt is `reattention eval passkey`'s (repeated filler, the key at ``--depth``). Prefill is the
time from the job's start to the first decode step; decode is timed over the later steps (each step
runs every layer on every rank and combines the shards with two collectives per layer).
``--check-single`` then answers the same prompt with the ordinary engine on rank 0's GPU (the
whole store resident there, CUDA graphs on) and compares the token ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import environment, sync

from reattention_core.distributed import ShardedEngine, init_from_env
from reattention_core.engine import ReAttentionEngine
from reattention_core.evaluation.haystack import Haystack
from reattention_core.evaluation.scoring import found
from reattention_core.evaluation.tasks import make_sample
from reattention_core.generation import TextStream


class StepClock:
    """Wraps the engine's decode step: when the first step started, when the last one ended."""

    def __init__(self, engine: ReAttentionEngine) -> None:
        self.inner, self.first, self.last, self.steps = engine._decode_step, None, None, 0
        engine._decode_step = self  # type: ignore[method-assign]  # benchmark instrumentation only

    def __call__(self, *args, **kwargs):
        if self.first is None:
            sync()
            self.first = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync()
        self.last, self.steps = time.perf_counter(), self.steps + 1
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--tokens", type=int, default=262144, help="prompt length in tokens")
    ap.add_argument("--depth", type=float, default=0.5, help="where the key sits (0..1)")
    ap.add_argument("--index", type=int, default=0, help="sample index (another key)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--check-single", action="store_true", help="also answer on one GPU and compare the tokens")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    device = init_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file, device=device, cache=False)
    sharded = ShardedEngine(engine)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    row: dict = {}
    if rank == 0:
        sample = make_sample(
            "passkey", engine.tokenizer, Haystack(engine.tokenizer, "filler"), args.tokens, args.depth, args.index
        )
        request = engine.prepare(sample.prompt, max_new_tokens=args.new_tokens)
        clock = StepClock(engine)
        sync()
        t0 = time.perf_counter()
        res = TextStream(sharded.run(list(request.ids), request.params)).collect()
        decode_ms = (clock.last - clock.first) / max(1, clock.steps) * 1000 if clock.steps else None
        engine._decode_step = clock.inner  # type: ignore[method-assign]
        hits = found(res.text, sample.expected)
        row = {
            "bench": "sharded",
            "model": engine.model_name,
            "world": world,
            "tokens": res.prompt_tokens,
            "depth": args.depth,
            "index": args.index,
            "expected": list(sample.expected),
            "answer": res.text,
            "hit": len(hits) == len(sample.expected),
            "token_ids": list(res.token_ids),
            "prefill_s": round(clock.first - t0, 3) if clock.first else None,
            "decode_ms_per_token": round(decode_ms, 3) if decode_ms else None,
            "decode_steps": clock.steps,
        }
    else:
        sharded.follow(once=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    peaks: list = [None] * world
    dist.all_gather_object(peaks, None if peak is None else round(peak, 3))
    if rank == 0:
        row["peak_gpu_gib_per_rank"] = peaks
        if args.check_single:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            single = engine.generate(sample.prompt, max_new_tokens=args.new_tokens, progress=False)
            row["single_gpu_s"] = round(time.perf_counter() - t0, 3)
            row["single_gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None
            row["equal_single"] = list(single.token_ids) == row["token_ids"]
        row.update(environment())
        print(json.dumps(row))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
