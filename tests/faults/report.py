"""The figures of the README's "Reliability" section: ``python -m tests.faults.report``.

Runs the three scenarios of the fault suite at full size (the tests run shorter, seeded versions
of the same code), prints one JSON object with every figure and a Markdown table, and exits 1
if any invariant broke (a wrong answer, a lost or damaged page, a temporary file read or left
behind, a 5xx, a traceback in the server's log, unbounded server memory)::

    python -m tests.faults.report                          # 60 kill -9 trials, 60 s of load
    python -m tests.faults.report --trials 24 --seconds 15 # what CI runs
    python -m tests.faults.report --out figures.json

Everything runs on the CPU over loopback, in a temporary folder; mounting the small tmpfs of
the full-disk scenario needs root (elsewhere it falls back to ``RLIMIT_FSIZE`` and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.faults import fullfs, kill9, load

ROOT = Path(__file__).resolve().parents[2]


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def problems(figures: dict[str, Any]) -> list[str]:
    """The invariants the README states, as broken ones (empty: all hold)."""
    k, d, s = figures["kill9"], figures["full_disk"], figures["server"]
    checks = {
        "kill -9: wrong answers": k["wrong_answers"] == 0,
        "kill -9: lost pages": k["lost_pages"] == 0,
        "kill -9: damaged pages": k["damaged_pages"] == 0,
        "kill -9: temporary files read": k["temporary_files_read"] == 0,
        "kill -9: temporary files left": k["temporary_files_left"] == 0,
        "full disk: wrong answers": d["wrong_answers"] == 0,
        "full disk: partial pages": d["partial_pages"] == 0,
        "full disk: temporary files left": d["temporary_files_left"] == 0,
        "full disk: one warning": d["warnings_while_full"] == 1,
        "full disk: the cache fills once space returns": d["complete_after_space_returned"],
        "full disk: spill error typed, nothing left": "could not reserve" in d["spill_error"]
        and d["spill_files_left"] == 0
        and d["spill_answer_after_space_returned_ok"],
        "server: 5xx": s["http_5xx"] == 0,
        "server: wrong answers": s["wrong_answers"] == 0,
        "server: tracebacks in its log": s["server_tracebacks"] == 0,
        "server: memory growth under 64 MiB": s["rss_growth_mib"] < 64,
        "server: healthy and idle afterwards": s["health_after"]["status"] == "ok" and not s["health_after"]["busy"],
    }
    return [name for name, ok in checks.items() if not ok]


def markdown(f: dict[str, Any]) -> str:
    k, d, s = f["kill9"], f["full_disk"], f["server"]
    modes = ", ".join(f"{v} {m}" for m, v in k["modes"].items())
    kill = (
        f"{k['trials']} trials ({modes}); {k['kills_during_run']} killed mid-run, "
        f"{k['kills_inside_page_writes']} inside a page write"
    )
    kill_result = (
        f"{k['answers_checked']} answers checked, {k['wrong_answers']} wrong; {k['pages_acknowledged']} "
        f"pages acknowledged before the kills, {k['lost_pages']} lost, {k['damaged_pages']} damaged, "
        f"{k['pages_reused']} reused; temporary files read {k['temporary_files_read']}, "
        f"left {k['temporary_files_left']}"
    )
    disk = f"{d['filesystem']}: cache full after {d['pages_written_until_full']} pages, spill reservation refused" + (
        ", then remounted read-only" if d["read_only_answers_ok"] is not None else ""
    )
    disk_result = (
        f"{d['answers_checked']} answers checked, {d['wrong_answers']} wrong; "
        f"{d['warnings_while_full']} warning; {d['partial_pages']} partial pages, "
        f"{d['temporary_files_left']} temporary files; space back: "
        f"{d['pages_restored_after_space_returned']} pages restored, "
        f"{d['pages_written_after_space_returned']} written"
    )
    faults = ", ".join(f"{v} {n}" for n, v in s["faults_injected"].items())
    server = f"{s['clients']} clients x {s['seconds']:.0f} s, {s['requests']} requests; faults: {faults}"
    server_result = (
        f"{s['completed']} answers completed, {s['wrong_answers']} wrong; {s['http_4xx']} 4xx "
        f"({s['http_429']} of them 429), {s['http_5xx']} 5xx; p50 {s['p50_ms']:.0f} ms, "
        f"p99 {s['p99_ms']:.0f} ms; RSS {s['rss_after_warmup_mib']:.0f} -> {s['rss_end_mib']:.0f} MiB "
        f"(peak {s['rss_peak_mib']:.0f}); {s['server_tracebacks']} tracebacks"
    )
    rows = [
        ("kill -9 mid-write", kill, kill_result),
        ("full disk", disk, disk_result),
        ("server under load", server, server_result),
    ]
    lines = ["| scenario | faults | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults.report", description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=60, help="kill -9 trials (default 60)")
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of server load (default 60)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reattention-faults-") as tmp:
        work = Path(tmp)
        print(f"kill -9: {args.trials} trials ...", file=sys.stderr, flush=True)
        k = kill9.run(work / "kill9", trials=args.trials, seed=args.seed)
        print("full disk ...", file=sys.stderr, flush=True)
        d = fullfs.run(work / "fullfs")
        print(f"server: {args.clients} clients for {args.seconds:.0f} s ...", file=sys.stderr, flush=True)
        s = load.run(work / "load", clients=args.clients, seconds=args.seconds, seed=args.seed)
    figures = {
        "kill9": k.as_dict(),
        "full_disk": d.as_dict(),
        "server": s.as_dict(),
        "env": {
            "commit": _commit(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(["python -m tests.faults.report", *(argv if argv is not None else sys.argv[1:])]),
        },
    }
    broken = problems(figures)
    figures["broken"] = broken
    text = json.dumps(figures, indent=1, default=str)
    print(text)
    print()
    print(markdown(figures))
    if args.out is not None:
        args.out.write_text(text + "\n")
    if broken:
        print(f"\nBROKEN: {', '.join(broken)}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
