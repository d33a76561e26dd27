"""The ``reattention`` command line.

    reattention demo                 # hide a pass key in ~8K tokens, let the embedded model find it
    reattention generate "Why is the sky blue?" --chat
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from reattention_core.config import MODES
from reattention_core.errors import ReAttentionError

# Modules that add subcommands (``register(subparsers, common_parent_parser)``). Keep imports
# inside the commands so that ``reattention --help`` stays fast.
_COMMAND_MODULES: tuple[str, ...] = ("reattention_core.serving.cli",)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _load(args: argparse.Namespace):
    from reattention_core.engine import ReAttentionEngine

    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    engine = ReAttentionEngine.from_pretrained(args.model, gguf_file=args.gguf_file)
    if args.mode:
        engine.config = engine.config.replace(mode=args.mode)
    return engine


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _load(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    for piece in engine.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               seed=args.seed, stop=args.stop or None):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    engine = _load(args)
    key = str(random.Random(args.seed).randint(10000, 99999))
    per = len(engine.tokenizer(FILLER)["input_ids"])
    n = max(2, args.tokens // per)
    at = int(n * args.depth)
    text = FILLER * at + f" The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (n - at)
    messages = [{"role": "user", "content": "There is a pass key hidden in this text.\n\n" + text + "\n\nWhat is the pass key?"}]
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt += "The pass key is"
    modes = ["reattention", "full"] if args.compare_full else [engine.config.mode]
    base = engine.config
    print(f"pass key {key} hidden at depth {args.depth:.0%} of ~{args.tokens} tokens "
          f"(the model's pre-training window is {engine.window})", flush=True)
    found_all = True
    for mode in modes:
        engine.config = base.replace(mode=mode)
        t0 = time.perf_counter()
        res = engine.generate(prompt, max_new_tokens=12, progress=True)
        ok = key in res.text
        found_all &= ok or mode != "reattention"
        scope = engine.config.scope_size
        print(f"{mode:>12}: {res.prompt_tokens} prompt tokens, scope {scope or 'all'} -> "
              f"'The pass key is{res.text}' [{'found' if ok else 'missed'}] ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    return 0 if found_all else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reattention", description="ReAttention: long context for local LLMs")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="model id or directory (default: embedded SmolLM2-135M)")
    common.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    common.add_argument("--mode", choices=MODES, default=None, help="attention mode (default: reattention)")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", parents=[common], help="complete a prompt (streamed)")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", parents=[common], help="find a pass key hidden in a long text")
    d.add_argument("--tokens", type=int, default=8192)
    d.add_argument("--depth", type=float, default=0.5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--compare-full", action="store_true", help="also run plain full attention")
    d.set_defaults(func=cmd_demo)

    # Larger command groups live in their own modules; each has ``register(sub, common)``.
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ReAttentionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
