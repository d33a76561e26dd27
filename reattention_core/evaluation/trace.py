"""``reattention eval trace``: why did a needle fail? What each layer's selection does with it.

Generates one evaluation sample's answer with a selection observer (`SelectionRecorder`) and records,
per layer, for the prompt's last token and the first decode steps, where the hits and selected blocks
fall relative to the needle (`per_layer`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reattention_core.attention import SelectionEvent
from reattention_kernels.reference import score_topk_ref


@dataclass
class SelectionRecorder:
    """A `SelectionObserver` that keeps the selections of one-row steps (a prompt's last token, decode
    steps), layer after layer: ``hits`` (store positions), ``sel`` (selected store positions)."""

    check_reference: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, event: SelectionEvent) -> None:
        if event.queries.shape[1] != 1:  # a prefill chunk
            return
        sink = event.plan.sink_len
        entry: dict[str, Any] = {
            "hits": [h + sink for h in event.hits.reshape(-1).tolist() if h >= 0],
            "sel": event.sel[0, : int(event.n_sel[0])].tolist(),
        }
        if self.check_reference and event.middle_keys is not None:
            top_k = event.hits.shape[-1]
            ref = score_topk_ref(event.queries.float(), event.middle_keys.float(), top_k).reshape(-1).tolist()
            entry["ref_mismatch"] = len(set(event.hits.reshape(-1).tolist()) - set(ref))
        self.calls.append(entry)


def needle_spans(tokenizer: Any, prompt: str, ids: list[int], expected: str) -> tuple[list[int], list[int]]:
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


def per_layer(calls: list[dict[str, Any]], layers: int, steps: int, sentence: list[int], digits: list[int]) -> list:
    """The recorded calls as ``[step][layer]`` summaries.

    ``hits``: the layer's top-k hits on the needle sentence; ``needle``: the fraction of the needle
    sentence's tokens in the selected blocks; ``key``: the same for the key's digit tokens (both
    mentions); ``distinct_hits``: distinct positions among the hits (``ref_mismatch``, with
    ``--check-reference``: kernel hits the PyTorch reference does not return). A failure with
    ``key`` = 0 in most layers is a selection miss; with the key in scope, the model not using it.
    """
    needle = set(sentence)
    out = []
    for s in range(min(1 + steps, len(calls) // layers)):
        rows = []
        for entry in calls[s * layers : (s + 1) * layers]:
            scope = set(entry["sel"])
            row = {
                "hits": sum(1 for h in entry["hits"] if h in needle),
                "needle": round(sum(p in scope for p in sentence) / len(sentence), 3),
                "key": round(sum(p in scope for p in digits) / len(digits), 3),
                "distinct_hits": len(set(entry["hits"])),
            }
            if "ref_mismatch" in entry:
                row["ref_mismatch"] = entry["ref_mismatch"]
            rows.append(row)
        out.append(rows)
    return out


def cmd_trace(args: argparse.Namespace) -> int:
    from reattention_core.evaluation.cli import _engine
    from reattention_core.evaluation.haystack import Haystack
    from reattention_core.evaluation.tasks import make_sample

    engine = _engine(args, cache=False)
    cfg = engine.config
    haystack = Haystack(engine.tokenizer, args.haystack)
    records = []
    for depth in args.depth:
        sample = make_sample("passkey", engine.tokenizer, haystack, args.length, depth, args.index, args.seed)
        ids = engine.encode(sample.prompt)
        sentence, digits = needle_spans(engine.tokenizer, sample.prompt, ids, sample.expected[0])
        recorder = SelectionRecorder(check_reference=args.check_reference)
        t0 = time.perf_counter()
        request = engine.prepare(sample.prompt, max_new_tokens=12)
        res = engine.start(request, progress=False, observer=recorder).collect()
        steps = per_layer(recorder.calls, engine.model.config.num_hidden_layers, args.steps, sentence, digits)
        rec = {
            "length": args.length, "depth": depth, "index": args.index, "prompt_tokens": len(ids),
            "needle_tokens": [sentence[0], sentence[-1]], "key_tokens": digits, "expected": sample.expected[0],
            "answer": res.text, "correct": sample.score(res.text) == 1.0,
            "seconds": round(time.perf_counter() - t0, 1), "steps": steps,
        }  # fmt: skip
        records.append(rec)
        first = steps[0] if steps else []
        mismatches = f", reference mismatches {sum(x.get('ref_mismatch', 0) for x in first)}"
        print(
            f"depth {depth}: {'OK ' if rec['correct'] else 'MISS'} key at {digits[:1]} answer {res.text!r}; "
            f"layers with the key in scope {sum(x['key'] > 0 for x in first)}/{len(first)}, "
            f"with needle hits {sum(x['hits'] > 0 for x in first)}/{len(first)}"
            + (mismatches if args.check_reference else ""),
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": engine.model_name, "config": cfg.to_dict(), "torch": torch.__version__,
              "device": str(engine.device), "records": records}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1))
    print(f"trace: {args.out}", file=sys.stderr)
    return 0


def register(evsub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``eval trace`` (a subcommand of ``reattention eval``)."""
    from reattention_core.evaluation.cli import parse_tokens
    from reattention_core.evaluation.haystack import HAYSTACK_KINDS

    t = evsub.add_parser("trace", parents=[common], help="what each layer's selection does with a pass-key needle")
    t.add_argument("--length", type=parse_tokens, required=True, help="prompt length in tokens: 4096, 4K, 1M")
    t.add_argument("--depth", type=float, nargs="+", required=True, help="needle depths, fractions in [0, 1]")
    t.add_argument("--haystack", choices=HAYSTACK_KINDS, default="filler", help="the text the needle goes into")
    t.add_argument("--index", type=int, default=0, help="sample index at these coordinates")
    t.add_argument("--seed", type=int, default=0, help="base seed of the samples")
    t.add_argument("--steps", type=int, default=3, help="decode steps traced after the prompt's last token")
    t.add_argument("--check-reference", action="store_true", help="compare each top-k with the PyTorch reference")
    t.add_argument("--out", type=Path, required=True, help="trace file (JSON)")
    t.set_defaults(func=cmd_trace)
