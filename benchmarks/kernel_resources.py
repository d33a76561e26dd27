"""Registers, spills and code size of the kernels for an H100/H200 (sm_90), on any machine, no GPU needed.

    python benchmarks/kernel_resources.py [--match blocks scope] [--out FILE.jsonl]

Compiles every variant that ``tests/kernels/compile_sm90.py`` lists (or those whose name contains a
``--match`` word) as a GPU would, then reports what ptxas says of the PTX Triton emitted (registers
per thread, spill stores and loads, stack frame) and the SASS instructions in the cubin. These are
static numbers, not timings: a kernel at 255 registers that spills is a lead to time on a GPU, and a
change that removes the spill still has to be timed there before it is called faster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.nvidia import compiler as nvidia

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
import compile_sm90  # the variant list lives with its compile test


def _ptxas() -> str:
    """The ptxas that Triton itself uses for sm_90 (its signature differs across Triton versions)."""
    try:
        tool = nvidia.get_ptxas(90)
    except TypeError:
        tool = nvidia.get_ptxas()
    return tool.path


def resources(src, warps: int, stages: int) -> dict:
    kernel = triton.compile(src, target=compile_sm90.TARGET, options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        report = subprocess.run(
            [_ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp, "v.cubin"))],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
        cuobjdump = Path(_ptxas()).with_name("cuobjdump")
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout

    def number(pattern: str) -> int | None:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else None

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "sass_instructions": sum(1 for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", line)),
        "num_warps": warps,
        "num_stages": stages,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--match", nargs="+", default=None, help="only variants whose name contains one of these")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    commit = (
        os.environ.get("REATTENTION_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    meta = {"target": "sm_90 (compiled on a CPU)", "triton": triton.__version__, "commit": commit or "unknown"}
    for name, src, warps, stages in compile_sm90.variants():
        label = " ".join(map(str, name))
        if args.match and not any(word in label for word in args.match):
            continue
        row = {"kernel": label, **resources(src, warps, stages), **meta}
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
