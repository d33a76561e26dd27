"""The ``reattention`` command line: ``ask``, ``generate``, ``cache ls|rm``, ``demo`` (and ``serve``, ``eval``).

Errors the user can fix (a missing path, a binary file, an empty question) exit with code 2 and a
one-line message that says what to do; the model is loaded only after the documents were read.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import datetime

from reattention_core.config import MODES
from reattention_core.errors import InvalidInputError, ReAttentionError

# Modules that add subcommands (``register(subparsers, common_parent_parser)``). Keep imports
# inside the commands so that ``reattention --help`` stays fast.
_COMMAND_MODULES: tuple[str, ...] = ("reattention_core.app.serving.cli", "reattention_core.evaluation.cli")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def offload_config(args: argparse.Namespace):
    """The `OffloadConfig` that ``--offload`` / ``--offload-budget`` ask for, or ``None``.

    ``values``: keys on the device, values in host memory (exact). ``host``: both in host memory;
    exact by default, or reading only ``--offload-budget`` bounded blocks (of ``--offload-block``
    tokens) per layer step, an approximation. ``--offload-budget`` alone implies ``host``.
    """
    from reattention_core.store.offloaded import OffloadConfig

    where = getattr(args, "offload", None)
    budget = getattr(args, "offload_budget", None)
    block = getattr(args, "offload_block", None) or 64
    spill = getattr(args, "spill_dir", None)
    if budget is not None and where == "values":
        raise InvalidInputError("--offload-budget applies to --offload host only (the values store is exact)")
    if where == "values":
        return OffloadConfig(keys="device", spill_dir=spill)
    if where == "host" or budget is not None:
        if budget is None:
            return OffloadConfig(block=block, spill_dir=spill)
        return OffloadConfig(block=block, budget=budget, refine=False, spill_dir=spill)
    if spill is not None:
        raise InvalidInputError("--spill-dir holds an offloaded store: add --offload values or --offload host")
    return None


def _load(args: argparse.Namespace):
    from reattention_core.engine import ReAttentionEngine

    offload = offload_config(args)  # a bad flag fails before the model loads
    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    engine = ReAttentionEngine.from_pretrained(
        args.model, gguf_file=args.gguf_file, offload=offload, compile_model=args.compile
    )
    if args.mode:
        engine.config = engine.config.replace(mode=args.mode)
    return engine


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _load(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    for piece in engine.stream(
        prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, stop=args.stop or None
    ):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from reattention_core.app.ask import AskSettings, ask, chat, question_prompt
    from reattention_core.app.corpus import load_corpus
    from reattention_core.app.sample_corpus import SAMPLE_QUESTION, write_sample_corpus

    paths = list(args.paths)
    if args.sample_corpus:
        write_sample_corpus(args.sample_corpus)
        paths.append(args.sample_corpus)
        if args.question is None and not args.chat:
            args.question = SAMPLE_QUESTION
            print(f"question: {SAMPLE_QUESTION}", file=sys.stderr)
    if args.question is not None:
        question_prompt(args.question)  # an empty question fails before the model loads
    elif not args.chat:
        print('error: no question; pass -q "..." or --chat for an interactive session', file=sys.stderr)
        return 2
    settings = AskSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    corpus = load_corpus(paths)
    skipped = f", {len(corpus.skipped)} binary or empty file(s) skipped" if corpus.skipped else ""
    print(f"documents: {len(corpus)} file(s), {len(corpus.text):,} characters{skipped}", file=sys.stderr, flush=True)
    engine = _load(args)
    if args.chat:
        chat(engine, corpus.text, settings, first_question=args.question)
    else:
        ask(engine, corpus.text, args.question, settings)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def cmd_cache_ls(args: argparse.Namespace) -> int:
    import json

    from reattention_core.cache.directory import default_cache_dir, default_max_bytes
    from reattention_core.cache.listing import list_cache
    from reattention_core.model_cache import list_conversions, model_cache_dir

    folder = args.dir or default_cache_dir()
    found = list_cache(folder)
    converted = list_conversions()
    if args.json:
        rows = [{k: v for k, v in vars(ns).items() if k != "manifest"} for ns in found]
        models = [{**vars(c), "folder": str(c.folder)} for c in converted]
        print(json.dumps({"dir": str(folder), "namespaces": rows, "converted_models": models}, indent=1))
        return 0
    if converted:
        print(f"converted GGUF models in {model_cache_dir()} (`cache rm --models` removes them):")
        for c in converted:
            print(f"  {c.source} ({c.dtype}, transformers {c.transformers}): {_size(c.bytes)}")
    total = sum(ns.bytes for ns in found)
    print(f"{folder}: {_size(total)} of {_size(default_max_bytes())} allowed")
    if not found:
        print("nothing cached")
        return 0
    print(
        f"{'model':<28} {'mode':<12} {'dtype':<9} {'device':<6} {'entries':>7} {'tokens':>10} {'size':>10}  "
        f"{'last used':<16}  namespace"
    )
    for ns in found:
        s = ns.settings
        used = datetime.fromtimestamp(ns.last_used).strftime("%Y-%m-%d %H:%M") if ns.last_used else "-"
        print(
            f"{ns.model_name:<28} {s.get('mode', '?'):<12} {s.get('dtype', '?'):<9} {s.get('device', '?'):<6} "
            f"{ns.entries:>7} {ns.tokens:>10,} {_size(ns.bytes):>10}  {used:<16}  {ns.namespace[:12]}"
        )
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from reattention_core.cache.directory import default_cache_dir
    from reattention_core.cache.listing import remove_cache

    if args.models:
        from reattention_core.model_cache import remove_conversions

        if args.model is not None or args.all:
            print("error: --models removes converted GGUF models only; run it on its own", file=sys.stderr)
            return 2
        removed_models = remove_conversions()
        if not removed_models:
            print("no converted models")
        for c in removed_models:
            print(f"removed the converted copy of {c.source} ({c.dtype}): {_size(c.bytes)}")
        return 0
    if (args.model is None) == (not args.all):
        print("error: name a model (as `reattention cache ls` shows it) or pass --all, not both", file=sys.stderr)
        return 2
    folder = args.dir or default_cache_dir()
    removed = remove_cache(folder, None if args.all else args.model)
    if not removed:
        print(f"nothing cached in {folder}")
    for ns in removed:
        print(
            f"removed {ns.model_name} [{ns.namespace[:12]}]: {ns.pages} page(s), {ns.tokens:,} tokens, "
            f"{_size(ns.bytes)}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not 0.0 <= args.depth <= 1.0:  # also refuses nan
        raise InvalidInputError(f"--depth is where the pass key goes, a fraction in [0, 1]; got {args.depth}")
    if args.tokens < 1:
        raise InvalidInputError(f"--tokens must be at least 1, got {args.tokens}")
    engine = _load(args)
    key = str(random.Random(args.seed).randint(10000, 99999))
    per = len(engine.tokenizer(FILLER)["input_ids"])
    n = max(2, args.tokens // per)
    at = int(n * args.depth)
    text = FILLER * at + f" The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (n - at)
    messages = [
        {"role": "user", "content": "There is a pass key hidden in this text.\n\n" + text + "\n\nWhat is the pass key?"}
    ]
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt += "The pass key is"
    modes = ["reattention", "full"] if args.compare_full else [engine.config.mode]
    base = engine.config
    print(
        f"pass key {key} hidden at depth {args.depth:.0%} of ~{args.tokens} tokens "
        f"(the model's pre-training window is {engine.window})",
        flush=True,
    )
    found_all = True
    for mode in modes:
        engine.config = base.replace(mode=mode)
        t0 = time.perf_counter()
        res = engine.generate(prompt, max_new_tokens=12, progress=True)
        ok = key in res.text
        found_all &= ok or mode != "reattention"
        scope = engine.config.scope_size
        print(
            f"{mode:>12}: {res.prompt_tokens} prompt tokens, scope {scope or 'all'} -> "
            f"'The pass key is{res.text}' [{'found' if ok else 'missed'}] ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
    return 0 if found_all else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reattention", description="ReAttention: long context for local LLMs")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="model id or directory (default: embedded SmolLM2-135M)")
    common.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    common.add_argument("--mode", choices=MODES, default=None, help="attention mode (default: reattention)")
    common.add_argument(
        "--offload",
        choices=("values", "host"),
        default=None,
        help="keep the KV store off the GPU: values (keys stay, values in host memory; exact) or "
        "host (keys and values in host memory, key bounds on the GPU)",
    )
    common.add_argument(
        "--offload-budget",
        type=int,
        default=None,
        metavar="BLOCKS",
        help="host store reading only this many bounded blocks per layer step (approximate; implies --offload host)",
    )
    common.add_argument(
        "--offload-block",
        type=int,
        default=64,
        metavar="TOKENS",
        help="tokens per bounded block of the host store (default 64)",
    )
    common.add_argument(
        "--compile",
        action="store_true",
        help="compile the model's decoder layers with torch.compile: faster steps on GPUs, after a "
        "first call that compiles for tens of seconds",
    )
    common.add_argument(
        "--spill-dir",
        default=None,
        metavar="DIR",
        help="with --offload: keep the host side in memory-mapped files in DIR (beyond RAM)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", parents=[common], help="complete a prompt (streamed)")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(func=cmd_generate)

    a = sub.add_parser("ask", parents=[common], help="answer questions over text files and folders (cached)")
    a.add_argument("paths", nargs="*", metavar="PATH", help="text files or folders (recursive; hidden ones skipped)")
    a.add_argument("-q", "--question", default=None, help="the question (with --chat: the first one)")
    a.add_argument("--chat", action="store_true", help="ask questions interactively over the same corpus")
    a.add_argument(
        "--sample-corpus",
        metavar="DIR",
        default=None,
        help="write Python standard library docstrings into DIR and add it to the corpus "
        "(without -q: ask a question whose answer is in it)",
    )
    a.add_argument("--max-new-tokens", type=int, default=256)
    a.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=None)
    a.set_defaults(func=cmd_ask)

    c = sub.add_parser("cache", help="list or remove the disk prefix cache")
    csub = c.add_subparsers(dest="cache_command", required=True)
    ls = csub.add_parser("ls", help="cached prefixes, tokens and bytes per model fingerprint")
    ls.add_argument(
        "--dir", default=None, help="cache folder (default: $REATTENTION_CACHE_DIR or ~/.cache/reattention)"
    )
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_cache_ls)
    rm = csub.add_parser("rm", help="remove one model's cached pages, or all of them (no confirmation)")
    rm.add_argument("model", nargs="?", default=None, help="model name as `cache ls` shows it, or a namespace prefix")
    rm.add_argument("--all", action="store_true", help="remove every cached page")
    rm.add_argument(
        "--models",
        action="store_true",
        help="remove the converted copies of GGUF models instead (the next load converts again)",
    )
    rm.add_argument(
        "--dir", default=None, help="cache folder (default: $REATTENTION_CACHE_DIR or ~/.cache/reattention)"
    )
    rm.set_defaults(func=cmd_cache_rm)

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
