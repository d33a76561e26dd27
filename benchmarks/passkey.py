"""Pass-key retrieval: a 5-digit key hidden at several depths of repeated filler text.

Same protocol as the prototype sweep quoted in DEVELOPERS.md: chat prompt, answer prefix
"The pass key is", greedy decoding, a hit when the key's digits appear in the answer.

    python benchmarks/passkey.py --tokens 12288 --depths 10 --modes reattention full \
        --out benchmarks/results/passkey-cpu-12k.jsonl

Results are appended per sample (JSON lines), so an interrupted run keeps what it finished and a
rerun with the same --out skips samples already there.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from reattention_core import ReAttentionConfig, ReAttentionEngine

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"


def build_prompt(engine: ReAttentionEngine, tokens: int, depth: float, key: str) -> str:
    """Chat-formatted prompt of about ``tokens`` tokens with the key at relative ``depth``."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    head = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    per_filler = len(engine.tokenizer(FILLER)["input_ids"])
    n_filler = max(1, (tokens - 120) // per_filler)
    at = round(n_filler * depth)
    body = FILLER * at + needle + FILLER * (n_filler - at)
    messages = [{"role": "user", "content": head + body + "\n\n" + QUESTION}]
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return rendered + ANSWER_PREFIX


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[12288])
    ap.add_argument("--depths", type=int, default=10, help="number of depths, evenly spread in [0.05, 0.95]")
    ap.add_argument("--modes", nargs="+", default=["reattention", "full"], choices=["reattention", "full", "streaming"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model id/dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file)
    base = engine.config
    rng = random.Random(args.seed)
    depths = [0.05 + 0.9 * i / max(1, args.depths - 1) for i in range(args.depths)]
    keys = [str(rng.randint(10000, 99999)) for _ in depths]
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["tokens"], r["mode"], round(r["depth"], 4)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    for tokens in args.tokens:
        for mode in args.modes:
            engine.config = base.replace(mode=mode)
            hits = 0
            for depth, key in zip(depths, keys):
                if (tokens, mode, round(depth, 4)) in done:
                    continue
                prompt = build_prompt(engine, tokens, depth, key)
                t0 = time.perf_counter()
                res = engine.generate(prompt, max_new_tokens=12)
                seconds = time.perf_counter() - t0
                ok = key in res.text
                hits += ok
                row = dict(
                    tokens=tokens,
                    prompt_tokens=res.prompt_tokens,
                    mode=mode,
                    depth=depth,
                    key=key,
                    answer=res.text,
                    hit=ok,
                    seconds=round(seconds, 2),
                    config=engine.config.to_dict(),
                    **meta,
                )
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{tokens:>8} {mode:<12} depth {depth:.2f} key {key} -> {res.text!r} {'HIT' if ok else 'miss'} "
                      f"({seconds:.1f}s)", flush=True)
    summarize(args.out)
    return 0


def summarize(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    table: dict[tuple[int, str], list[bool]] = {}
    for r in rows:
        table.setdefault((r["tokens"], r["mode"]), []).append(r["hit"])
    print("\n| tokens | mode | found |\n|---|---|---|")
    for (tokens, mode), hits in sorted(table.items()):
        print(f"| {tokens} | {mode} | {sum(hits)}/{len(hits)} |")


if __name__ == "__main__":
    sys.exit(main())
