"""Would the one-token steps select better with more queries voting, or with a wider top-k?

A probe for the pass-key misses at 128K (docs/results.md): there the prompt's last token alone
(the step that picks the first answer token) selects blocks in which the needle is missing in the
last layers. The reference code has a disabled, broken multi-query buffer for decode
(``q_cache_len``, ../shared/research/algorithm.md). This probe tries the idea without touching the
engine: it wraps the selection so that every one-token step scores the current query together with
the ``W - 1`` queries before it (the prompt's tail, then the generated tokens), all rows voting
as a prefill chunk's rows do. It can also give one-token steps their own ``top_k`` and
``max_blocks`` (a wider scope only where a single query votes; prefill chunks keep the preset), and
prefill the prompt's last ``T`` tokens before its last one as a chunk of their own (``--tails``: the
question then selects without the votes of the haystack rows that share its chunk otherwise).

Per needle the prompt (all but its last token) is prefilled once; then, for each variant
``TOP_K:MAX_BLOCKS:W``, the store is cut back to that point and the last token plus the answer run
eagerly with it. The preset's ``4:32:1`` is the engine as it is.

    python3 benchmarks/probe_query_window.py --model <dir> --gguf-file <file> --variants 4:32:1 4:32:8 8:64:1 \\
        --needles 131072:0.5:0 131072:0.3:0:0.02 --out /tmp/window.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import reattention_core.attention as attention_mod
from reattention_core import ReAttentionEngine
from reattention_core.evaluation.env import environment
from reattention_core.evaluation.haystack import Haystack
from reattention_core.evaluation.tasks import make_sample
from reattention_core.hf.cache import ReAttentionCache
from reattention_core.prefill import run_prefill


class WindowedSelection:
    """Wraps `attention.select_blocks`: one-token calls score the last ``window`` query rows, with
    ``top_k`` and ``max_blocks`` of their own when set."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.window = 1
        self.top_k: int | None = None
        self.max_blocks: int | None = None
        self.calls = 0
        self.rows: list[torch.Tensor | None] = [None] * num_layers  # per layer: recent pre-RoPE queries
        self.inner = attention_mod.select_blocks

    def __call__(self, q: torch.Tensor, k_middle: torch.Tensor, **kw):
        layer = self.calls % self.num_layers
        self.calls += 1
        prev = self.rows[layer]
        scored = q
        if q.shape[1] == 1:
            if self.window > 1 and prev is not None:
                scored = torch.cat([prev[:, -(self.window - 1) :], q], dim=1)
            kw["top_k"] = self.top_k or kw["top_k"]
            kw["max_blocks"] = self.max_blocks or kw["max_blocks"]
        # keep enough history for the largest window (each layer's last multi-row call, then one-token calls)
        keep = q if prev is None or q.shape[1] > 1 else torch.cat([prev, q], dim=1)
        self.rows[layer] = keep[:, -512:].clone()
        return self.inner(scored, k_middle, **kw)


def parse_needle(text: str) -> tuple[int, float, int, float]:
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise SystemExit(f"a needle is LENGTH:DEPTH:INDEX[:JITTER], got {text!r}")
    return int(parts[0]), float(parts[1]), int(parts[2]), float(parts[3]) if len(parts) == 4 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--haystack", default="filler")
    ap.add_argument("--needles", nargs="+", required=True, help="LENGTH:DEPTH:INDEX[:JITTER] each")
    ap.add_argument("--variants", nargs="+", default=["4:32:1", "4:32:8"], help="TOP_K:MAX_BLOCKS:WINDOW each")
    ap.add_argument("--tails", type=int, nargs="+", default=[0], help="prompt tails prefilled as a chunk of their own")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file, cache=False)
    cfg = engine.config
    haystack = Haystack(engine.tokenizer, args.haystack)
    wrapper = WindowedSelection(engine.model.config.num_hidden_layers)
    env = environment(engine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    attention_mod.select_blocks = wrapper
    try:
        with args.out.open("a") as out:
            for spec in args.needles:
                length, depth, index, jitter = parse_needle(spec)
                sample = make_sample("passkey", engine.tokenizer, haystack, length, depth, index, jitter=jitter)
                ids = engine.encode(sample.prompt)
                n = len(ids)
                t0 = time.perf_counter()
                with engine._lock, engine._running(cfg):
                    store = engine._fresh_store(n + args.new_tokens)
                    cache = ReAttentionCache(store)
                    input_ids = torch.tensor([ids], device=engine.device)
                    # the prompt up to a chunk boundary before every tail runs once (through graphs); the
                    # rest runs eagerly per tail, so the wrapper sees its queries
                    chunk = cfg.prefill_chunk_size
                    base = (n - 1 - max(args.tails)) // chunk * chunk
                    wrapper.calls, wrapper.rows = 0, [None] * wrapper.num_layers
                    run_prefill(engine.model, input_ids[:, :base], cache, chunk, last_alone=False,
                                progress=False, graph=engine._prefill_graph(cache, base, n + args.new_tokens))
                    prefill_s = time.perf_counter() - t0
                    for tail_len, variant in [(t, v) for t in args.tails for v in args.variants]:
                        top_k, max_blocks, window = (int(x) for x in variant.split(":"))
                        store.truncate(base)
                        wrapper.window, wrapper.top_k, wrapper.max_blocks = 1, None, None
                        # a tail of T tokens: the prompt's last T tokens before its last one form a chunk of their own
                        breaks = (n - 1 - tail_len,) if tail_len else ()
                        run_prefill(engine.model, input_ids[:, : n - 1], cache, chunk, start=base, last_alone=False,
                                    progress=False, breaks=breaks)
                        wrapper.window, wrapper.calls = window, 0
                        wrapper.top_k, wrapper.max_blocks = top_k, max_blocks
                        token, answer = ids[-1], []
                        for _ in range(args.new_tokens):
                            logits = engine._decode_step(token, cache)
                            token = int(logits[0].argmax())
                            if token in engine._eos_ids:
                                break
                            answer.append(token)
                        text = engine.tokenizer.decode(answer, skip_special_tokens=True)
                        row = {
                            "length": length, "depth": depth, "index": index, "jitter": jitter,
                            "needle_depth": sample.needle_depth, "variant": variant, "tail": tail_len, "window": window, "prompt_tokens": n,
                            "expected": sample.expected[0], "answer": text, "score": sample.score(text),
                            "prefill_s": round(prefill_s, 2), "config": cfg.to_dict(), "env": env,
                        }  # fmt: skip
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                        print(f"{length} d{depth} i{index} j{jitter} {variant} tail {tail_len}: "
                              f"{'OK  ' if row['score'] == 1 else 'MISS'} {text!r}", flush=True)
    finally:
        attention_mod.select_blocks = wrapper.inner
    return 0


if __name__ == "__main__":
    sys.exit(main())
