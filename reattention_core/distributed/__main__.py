"""Generate with a sharded KV store under torchrun (rank 0 prints the answer and timings).

torchrun --nproc-per-node 2 -m reattention_core.distributed "What is the capital of France?" --chat
torchrun --nproc-per-node 2 -m reattention_core.distributed --file book.txt --question "Who is the narrator?"
"""

from __future__ import annotations

import argparse
import sys
import time

from reattention_core.errors import ReAttentionError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reattention_core.distributed", description=__doc__.split("\n")[0])
    ap.add_argument("prompt", nargs="?", default=None)
    ap.add_argument("--file", default=None, help="a text file put before the question as context=")
    ap.add_argument("--question", default=None, help="the question about --file")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt as a user message")
    ap.add_argument("--model", default=None, help="model id or directory (default: embedded SmolLM2-135M)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl with CUDA, else gloo")
    args = ap.parse_args(argv)
    prompt = args.question if args.file else args.prompt
    if not prompt:  # checked on every rank (same arguments), so no rank waits for a job that never comes
        ap.error("give a prompt, or --file with --question")

    from reattention_core.distributed import ShardedEngine, init_from_env
    from reattention_core.engine import ReAttentionEngine

    try:
        device = init_from_env(args.backend)
        engine = ReAttentionEngine.from_pretrained(args.model, device=device, cache=False)
        sharded = ShardedEngine(engine)
        context = open(args.file, encoding="utf-8").read() if args.file else None
        if args.chat or context is not None:
            prompt = [{"role": "user", "content": prompt}]
        t0 = time.perf_counter()
        res = sharded.generate(prompt, context=context, max_new_tokens=args.max_new_tokens)
        if res is not None:
            seconds = time.perf_counter() - t0
            print(res.text)
            print(
                f"[{res.prompt_tokens} prompt tokens, {res.completion_tokens} generated, {seconds:.1f}s, "
                f"KV store over {sharded.world} ranks]",
                file=sys.stderr,
            )
        return 0
    except ReAttentionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
