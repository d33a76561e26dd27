"""Pass-key retrieval over lengths and depths: now ``reattention eval passkey``; this script forwards.

Old commands keep working: ``--tokens`` means ``--lengths``, the haystack is the repeated filler
(the protocol of the 12K CPU run in benchmarks/README.md) and the modes default to reattention and
full. Keys are now drawn from each sample's coordinates (seed, length, depth, index), so they differ
from the keys of the runs made with the earlier version of this script.

    python benchmarks/passkey.py --tokens 12288 --depths 10 --modes reattention full \
        --out benchmarks/results/passkey-cpu-12k.jsonl

See ``reattention eval passkey --help`` for everything else (--samples, --haystack docs, --plot, --limit).
"""

from __future__ import annotations

import sys

from reattention_core.cli import main


def translate(argv: list[str]) -> list[str]:
    """Old flags -> ``reattention eval passkey`` arguments."""
    args = ["--lengths" if a == "--tokens" else a for a in argv]
    if "--haystack" not in args:
        args += ["--haystack", "filler"]
    if "--modes" not in args:
        args += ["--modes", "reattention", "full"]
    return ["eval", "passkey", *args]


if __name__ == "__main__":
    sys.exit(main(translate(sys.argv[1:])))
