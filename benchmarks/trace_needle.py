"""Why did a needle fail? Trace what each layer's selection does with it.

Builds one evaluation sample (the same prompt ``reattention eval`` runs for these coordinates),
generates its answer greedily, and records, for the prompt's last token (the step that chooses the
first answer token) and the first decode steps, per layer:

* ``hits``: how many of the layer's top-k hits (query heads x top_k) land on the needle sentence;
* ``needle``: the fraction of the needle sentence's tokens inside the selected blocks;
* ``key``: the fraction of the key's digit tokens (both mentions) inside the selected blocks;
* ``ref_mismatch`` (``--check-reference``): hits of the dispatched kernel that the PyTorch reference
  does not return for the same inputs (0 = the kernel's selection is exact here).

A failure with ``key`` = 0 in most layers is a selection miss; one with the key in scope is the
model not using what it sees. Diagnostic only (it wraps the selection functions in place).

    python3 benchmarks/trace_needle.py --model <dir> --gguf-file <file> --length 131072 --depth 0.5 \\
        --check-reference --out /tmp/trace.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import reattention_core.attention.layer as attention_mod
import reattention_core.attention.selection as selection_mod
from reattention_core import ReAttentionEngine
from reattention_core.evaluation.haystack import Haystack
from reattention_core.evaluation.tasks import make_sample
from reattention_kernels import score_topk_ref


def needle_spans(tokenizer, prompt: str, ids: list[int], expected: str) -> tuple[list[int], list[int]]:
    """Token positions of the needle sentence and of the key's digits, from character offsets."""
    enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
    if list(enc["input_ids"]) != list(ids):
        raise SystemExit("offset tokenization differs from the engine's encoding; cannot locate the needle")
    start = prompt.index(f"The pass key is {expected}.")
    end = prompt.index(f"{expected} is the pass key.", start) + len(f"{expected} is the pass key.")
    keys = [(p, p + len(expected)) for p in (prompt.index(expected, start), prompt.index(expected, start + 20))]
    sentence, digits = [], []
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a < end and b > start:
            sentence.append(i)
        if any(a < ke and b > ks for ks, ke in keys):
            digits.append(i)
    return sentence, digits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--task", default="passkey", choices=["passkey"])
    ap.add_argument("--haystack", default="filler")
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--depth", type=float, nargs="+", required=True)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3, help="decode steps traced after the prompt's last token")
    ap.add_argument("--check-reference", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file, cache=False)
    cfg = engine.config
    haystack = Haystack(engine.tokenizer, args.haystack)
    records: list[dict] = []
    calls: list[dict] = []
    orig_topk, orig_select = selection_mod.score_topk, attention_mod.select_blocks

    def traced_topk(q, k, top_k, backend=None):
        hits = orig_topk(q, k, top_k, backend=backend)
        if q.shape[1] == 1:
            entry = {"hits": hits.reshape(-1).tolist()}
            if args.check_reference:
                ref = score_topk_ref(q.float(), k.float(), top_k).reshape(-1).tolist()
                entry["ref_mismatch"] = len(set(entry["hits"]) - set(ref))
            calls.append(entry)
        return hits

    def traced_select(q, k_middle, **kw):
        sel, n_sel = orig_select(q, k_middle, **kw)
        if q.shape[1] == 1:
            calls[-1]["sel"] = sel[0, : int(n_sel[0])].tolist()
        return sel, n_sel

    selection_mod.score_topk, attention_mod.select_blocks = traced_topk, traced_select
    try:
        for depth in args.depth:
            sample = make_sample(args.task, engine.tokenizer, haystack, args.length, depth, args.index, args.seed)
            ids = engine.encode(sample.prompt)
            sentence, digits = needle_spans(engine.tokenizer, sample.prompt, ids, sample.expected[0])
            calls.clear()
            t0 = time.perf_counter()
            res = engine.generate(sample.prompt, max_new_tokens=12, progress=False)
            seconds = time.perf_counter() - t0
            layers = engine.model.config.num_hidden_layers
            steps = []
            for s in range(min(1 + args.steps, len(calls) // layers)):
                per_layer = []
                for entry in calls[s * layers : (s + 1) * layers]:
                    # selection positions are relative to the middle, which starts after the sink
                    hits = {h + cfg.sink_size for h in entry["hits"] if h >= 0}
                    scope = {p + cfg.sink_size for p in entry.get("sel", [])}
                    per_layer.append(
                        {
                            "hits": sum(1 for h in entry["hits"] if h >= 0 and h + cfg.sink_size in set(sentence)),
                            "needle": round(sum(p in scope for p in sentence) / len(sentence), 3),
                            "key": round(sum(p in scope for p in digits) / len(digits), 3),
                            **({"ref_mismatch": entry["ref_mismatch"]} if "ref_mismatch" in entry else {}),
                            "distinct_hits": len(hits),
                        }
                    )
                steps.append(per_layer)
            rec = {
                "length": args.length,
                "depth": depth,
                "index": args.index,
                "prompt_tokens": len(ids),
                "needle_tokens": [sentence[0], sentence[-1]],
                "key_tokens": digits,
                "expected": sample.expected[0],
                "answer": res.text,
                "correct": sample.score(res.text) == 1.0,
                "seconds": round(seconds, 1),
                "steps": steps,
            }
            records.append(rec)
            first = steps[0] if steps else []
            print(
                f"depth {depth}: {'OK ' if rec['correct'] else 'MISS'} key at {digits[:1]} answer {res.text!r}; "
                f"layers with the key in scope {sum(x['key'] > 0 for x in first)}/{len(first)}, "
                f"with needle hits {sum(x['hits'] > 0 for x in first)}/{len(first)}"
                + (
                    f", reference mismatches {sum(x.get('ref_mismatch', 0) for x in first)}"
                    if args.check_reference
                    else ""
                ),
                flush=True,
            )
    finally:
        selection_mod.score_topk, attention_mod.select_blocks = orig_topk, orig_select
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": engine.model_name,
                "config": cfg.to_dict(),
                "torch": torch.__version__,
                "device": str(engine.device),
                "records": records,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
