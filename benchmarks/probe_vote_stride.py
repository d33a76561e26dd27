"""Probe: prefill selection voted by every S-th query row of a chunk instead of all of them.

A prefill chunk's selection scores every middle key against every query row of the chunk (exact
per-row, per-head top-k, then votes), so prefill scoring is O(N^2 d) like full attention's QK^T.
This probe asks what voting with a strided subset of the rows would buy and cost, without changing
the engine: it wraps ``reattention_core.attention.select_blocks`` so that a chunk of TQ > 1 rows
votes with rows ``TQ-1, TQ-1-S, TQ-1-2S, ...`` (the chunk's last row always votes: at the prompt's
end it is the question). Decode steps (one row) are untouched. Everything after the wrap is the
engine as it is; the command after ``--`` runs in this process:

    python benchmarks/probe_vote_stride.py --stride 4 -- eval passkey $M --lengths 128K ...  # reattention CLI
    python benchmarks/probe_vote_stride.py --stride 4 --bench -- --model llama8b-random ...  # bench_engine.py

Results files record the stride only through this command line (the engine's config does not know
it): name them after the stride. The package has since taken it as the opt-in config field
``prefill_vote_stride`` (``--set prefill_vote_stride=S``), which does the same; benchmarks/README.md
("Prefill chunks voting with every 4th query row", "Prefill vote stride") has what both found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reattention_core import attention
from reattention_core.selection import voting_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_engine, for --bench

_select = attention.select_blocks


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: probe_vote_stride.py --stride S [--bench] -- <reattention or bench_engine arguments>")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stride", type=int, required=True, help="every S-th row of a prefill chunk votes (1 = the engine)")
    ap.add_argument("--bench", action="store_true", help="run benchmarks/bench_engine.py instead of the reattention CLI")
    args = ap.parse_args(argv[:cut])
    if args.stride < 1:
        raise SystemExit(f"--stride must be >= 1, got {args.stride}")
    stride = args.stride

    def select_blocks(q, k_middle, **kw):
        return _select(voting_rows(q, stride), k_middle, **kw)

    attention.select_blocks = select_blocks
    print(f"probe_vote_stride: prefill chunks vote with every {stride}th row", flush=True)
    if args.bench:
        import bench_engine

        return bench_engine.main(argv[cut + 1 :])
    from reattention_core.cli import main as cli_main

    return cli_main(argv[cut + 1 :])


if __name__ == "__main__":
    raise SystemExit(main())
