"""A pass-key prompt over a KV store sharded across GPUs: prefill seconds, decode ms/token, memory
per GPU, whether the key was found, and (``--check-single``) whether one GPU gives the same tokens.

Run one process per GPU under torchrun (NCCL); rank 0 writes one JSON line:

    torchrun --nproc-per-node 2 benchmarks/bench_sharded.py $M --tokens 262144 --check-single --out $OUT/sharded.jsonl

The prompt is `reattention eval passkey`'s (repeated filler, the key at ``--depth``). Prefill is the
time from the job's start to its first piece of text (the first token, sampled from the prefill);
decode is the time from there to the last piece over the tokens generated after the first (each
step runs every layer on every rank and combines the shards with two collectives per layer).
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
from reattention_core.generation.request import TextStream


def timed(run, marks: list[float]):
    """``run`` (a generation's pieces of text), appending the time each piece arrived to ``marks``."""
    while True:
        try:
            piece = next(run)
        except StopIteration as done:
            return done.value
        sync()
        marks.append(time.perf_counter())
        yield piece


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
        marks: list[float] = []
        sync()
        t0 = time.perf_counter()
        res = TextStream(timed(sharded.run(list(request.ids), request.params), marks)).collect()
        steps = res.completion_tokens - 1
        decode_ms = (marks[-1] - marks[0]) / steps * 1000 if marks and steps > 0 else None
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
            "prefill_s": round(marks[0] - t0, 3) if marks else None,
            "decode_ms_per_token": round(decode_ms, 3) if decode_ms else None,
            "decode_steps": steps,
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
