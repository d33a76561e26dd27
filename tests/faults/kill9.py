"""kill -9 mid-write: a process prefilling into a cache folder is SIGKILLed; a fresh one answers from it.

Each trial runs a child process that generates an answer over a corpus (``context=``, so the
corpus is cached to its last token: whole pages and a tail page) with its prefix cache in a new
folder, and kills it with ``SIGKILL`` at a seeded moment:

* ``timed``: a seeded delay after the child starts its generation (uniform over a little more
  than the time a whole run takes, measured first), so the kill lands anywhere: in a chunk's
  forward pass, inside a page write, or after the run;
* ``mid-write``, ``before-rename``, ``after-rename``: the child stops inside the page-write path
  of a seeded page and the kill lands exactly there: in the middle of writing the temporary
  file (after a seeded share of its bytes), with the temporary file complete and fsync'ed but
  not yet renamed, or renamed but the folder not yet fsync'ed. To stop there, the child wraps the
  package's writer (``disk_cache._write_page_file``, ``_fsync_dir``): it reports where it is
  through a pipe and sleeps until it is killed. The writer's own code runs unchanged.

Some trials first copy the reference run's first pages into the folder, so the killed child
also restores pages before it writes more. The child reports every page ``save`` returned
``"written"`` for (after the rename) through the pipe, so the parent knows which pages were
acknowledged before the kill.

After each kill, a fresh process (forked from a clean server, see `tests.faults.common`) answers
the same question from the folder, with an audit hook recording every file it opens. Checked:

* its greedy tokens equal a cold run's (cache off);
* every page on disk after the kill is byte-identical to the reference run's page of that name,
  and every page acknowledged before the kill is there and restored (``cached_tokens`` covers it);
* no temporary file is opened for reading (audit hook) or handed to the page loader;
* afterwards the folder holds exactly the reference pages and no temporary file: the leftovers of
  the killed writer were swept without anybody cleaning up by hand.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.common import (
    QUESTION,
    call,
    child_setup,
    corpus,
    page_files,
    process_context,
    start,
    temp_files,
    tiny_engine,
)

CORPUS = corpus(1005, seed=33)  # rendered: 63 pages of 16 tokens and a tail page of 5
NEW_TOKENS = 8
MODES = ("timed", "mid-write", "before-rename", "after-rename")
# Trial i uses _ROTATION[i % len(_ROTATION)]: half timed kills, half aimed into the write path.
_ROTATION = ("timed", "mid-write", "timed", "before-rename", "timed", "after-rename")
_WAIT_S = 120.0


@dataclass(frozen=True)
class Plan:
    """One trial: how and where the child is killed."""

    trial: int
    mode: str
    delay: float  # timed: seconds after the child starts generating
    page: int  # aimed modes: the page whose write the child stops in
    fraction: float  # mid-write: share of the page's bytes written when it stops
    preseed: int  # reference pages copied into the folder before the child starts


@dataclass
class Reference:
    """The uninterrupted run: cold tokens, its pages, its duration."""

    tokens: list[int]
    folder: Path
    pages: dict[str, bytes]
    boundary: int  # corpus tokens (where the question starts)
    run_s: float


@dataclass
class TrialResult:
    plan: Plan
    run_ended: bool  # the child finished before the kill landed
    stalled_at: str | None  # where an aimed kill landed
    acknowledged: int  # pages `save` reported written before the kill (and preseeded ones)
    pages_after_kill: int
    temps_after_kill: int
    reused_tokens: int  # tokens the fresh process restored from the folder
    reused_pages: int  # pages those tokens make
    expected_reuse: int  # tokens the pages on disk after the kill cover
    correct: bool  # greedy tokens equal the cold run's
    lost_pages: int  # acknowledged pages missing after the kill
    damaged_pages: int  # page files that differ from the reference's
    temp_reads: list[str]
    temps_left: int  # temporary files after the fresh process ran
    final_pages_ok: bool  # the folder ends with exactly the reference pages


@dataclass
class Kill9Figures:
    trials: int
    modes: dict[str, int]
    kills_during_run: int
    kills_inside_page_writes: int  # the kill left a temporary file behind
    pages_acknowledged: int
    pages_reused: int
    answers_checked: int
    wrong_answers: int
    lost_pages: int
    damaged_pages: int
    temporary_files_read: int
    temporary_files_left: int
    seconds: float
    results: list[TrialResult] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("results")
        return out


# -- children (run in forked processes) ------------------------------------------------------------


class _StallingFile:
    """Passes writes to ``fh`` until ``limit`` bytes, writes up to the limit, then stops the process there."""

    def __init__(self, fh, limit: int, stall) -> None:
        self.fh, self.limit, self.stall, self.written = fh, limit, stall, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        room = self.limit - self.written
        if len(view) > room:
            self.fh.write(view[:room])
            self.fh.flush()  # what a process killed here has handed to the kernel
            self.stall(f"mid-write at byte {self.written + room}")
        self.written += len(view)
        return self.fh.write(view)

    def flush(self) -> None:
        self.fh.flush()
        self.stall(f"mid-write, all {self.written} bytes written, not yet flushed to disk")

    def fileno(self) -> int:
        return self.fh.fileno()


def _install_stall(conn, plan: dict[str, Any]) -> None:
    from reattention_core.cache import disk as dc

    real_write, real_fsync_dir = dc.write_page_file, dc.fsync_dir
    armed = {"renamed": False}

    def stall(where: str) -> None:
        conn.send(("stalled", where))
        time.sleep(3600)  # the parent kills this process now

    def write(fh, keys, values, meta):
        if int(meta["index"]) != plan["page"]:
            return real_write(fh, keys, values, meta)
        if plan["mode"] == "mid-write":
            size = sum(t.numel() * t.element_size() for t in (*keys, *values)) + 600  # + about the header
            return real_write(_StallingFile(fh, int(size * plan["fraction"]), stall), keys, values, meta)
        real_write(fh, keys, values, meta)
        if plan["mode"] == "before-rename":
            stall("temporary file complete and fsync'ed, not renamed")
        armed["renamed"] = True

    def fsync_dir(path):
        if armed["renamed"]:
            stall("renamed into place, folder not yet fsync'ed")
        return real_fsync_dir(path)

    dc.write_page_file = write
    dc.fsync_dir = fsync_dir


def _generating_child(conn, folder: str, plan: dict[str, Any] | None) -> None:
    """Generate over the corpus with the cache in ``folder``; report pages written, then the result."""
    child_setup()
    from reattention_core.cache import disk as dc

    engine = tiny_engine(folder)
    real_save = dc.DiskCache.save

    def save(self, fp, ref, keys, values, **kw):
        result = real_save(self, fp, ref, keys, values, **kw)
        if result == "written":
            conn.send(("written", ref.index))
        return result

    dc.DiskCache.save = save
    if plan is not None and plan["mode"] != "timed":
        _install_stall(conn, plan)
    boundary = len(engine.prompts.context_prefix_ids(CORPUS))
    conn.send(("ready", boundary))
    t0 = time.perf_counter()
    result = engine.generate(QUESTION, context=CORPUS, max_new_tokens=NEW_TOKENS, progress=False)
    conn.send(("done", list(result.token_ids), result.cached_tokens, time.perf_counter() - t0))
    if plan is not None:
        time.sleep(3600)  # a timed kill may still come: wait for it


def _cold_child(conn) -> None:
    child_setup()
    result = tiny_engine(None, cache=False).generate(
        QUESTION, context=CORPUS, max_new_tokens=NEW_TOKENS, progress=False
    )
    conn.send(list(result.token_ids))


def _answering_child(conn, folder: str) -> None:
    """A fresh process answering from ``folder``; records every temporary file opened for reading."""
    child_setup()
    from reattention_core.cache import disk as dc

    temp_reads: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path, mode, flags = os.fsdecode(args[0]), args[1], args[2]
        if dc.TMP_PREFIX not in os.path.basename(path):
            return
        reading = ("r" in mode or "+" in mode) if isinstance(mode, str) else (flags & os.O_ACCMODE) != os.O_WRONLY
        if reading:
            temp_reads.append(path)

    sys.addaudithook(audit)
    real_read = dc.read_page

    def read_page(ref, *args, **kwargs):
        if ref.path.name.startswith(dc.TMP_PREFIX):
            temp_reads.append(str(ref.path))
        return real_read(ref, *args, **kwargs)

    dc.read_page = read_page
    result = tiny_engine(folder).generate(QUESTION, context=CORPUS, max_new_tokens=NEW_TOKENS, progress=False)
    conn.send((list(result.token_ids), result.cached_tokens, temp_reads))


# -- parent ---------------------------------------------------------------------------------------


def _receive(conn, proc, until: set[str], timeout: float, log: list[tuple]) -> tuple | None:
    """Collect messages into ``log`` until one whose tag is in ``until`` (returned), or the child ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(0.02):
            try:
                msg = conn.recv()
            except EOFError:
                return None
            log.append(msg)
            if msg[0] in until:
                return msg
        elif not proc.is_alive() and not conn.poll():
            return None
    raise TimeoutError(f"no {sorted(until)} from the child within {timeout:.0f}s")


def _drain(conn, log: list[tuple]) -> None:
    while True:
        try:
            if not conn.poll():
                return
            log.append(conn.recv())
        except (EOFError, OSError):
            return


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in page_files(folder)}


def reference_run(ctx, folder: Path) -> Reference:
    """The cold answer (cache off) and an uninterrupted cached run into ``folder``."""
    cold = call(ctx, _cold_child)
    proc, conn = start(ctx, _generating_child, str(folder), None)
    log: list[tuple] = []
    try:
        done = _receive(conn, proc, {"done"}, _WAIT_S, log)
    finally:
        proc.join(_WAIT_S)
    assert done is not None, "the reference run died"
    _, tokens, cached, run_s = done
    assert tokens == cold and cached == 0, "the cached run must equal the cold one"
    boundary = next(m[1] for m in log if m[0] == "ready")
    return Reference(cold, folder, _snapshot(folder), boundary, run_s)


def make_plans(trials: int, seed: int, pages: int, run_s: float) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for i in range(trials):
        mode = _ROTATION[i % len(_ROTATION)]
        preseed = rng.randrange(1, pages // 2) if rng.random() < 0.25 else 0
        plans.append(
            Plan(
                trial=i,
                mode=mode,
                delay=round(rng.uniform(0.0, 1.15 * run_s), 4) if mode == "timed" else 0.0,
                page=rng.randrange(preseed, pages),
                fraction=round(rng.random(), 4),
                preseed=preseed,
            )
        )
    return plans


def _preseed(reference: Reference, folder: Path, pages: int) -> None:
    src_ns = next(reference.folder.iterdir())
    ns = folder / src_ns.name
    ns.mkdir(parents=True)
    shutil.copy2(src_ns / "manifest.json", ns / "manifest.json")
    for name in sorted(reference.pages)[:pages]:
        (ns / name).write_bytes(reference.pages[name])


def _covered(indices: set[int], boundary: int, page: int) -> int:
    """Tokens covered by the consecutive pages 0.. found in ``indices``."""
    k = 0
    while k in indices:
        k += 1
    return min(k * page, boundary)


def run_trial(ctx, plan: Plan, folder: Path, reference: Reference, page: int) -> TrialResult:
    if plan.preseed:
        _preseed(reference, folder, plan.preseed)
    proc, conn = start(ctx, _generating_child, str(folder), asdict(plan))
    log: list[tuple] = []
    stalled = None
    try:
        if _receive(conn, proc, {"ready"}, _WAIT_S, log) is None:
            raise RuntimeError(f"trial {plan.trial}: the child died before it was ready")
        if plan.mode == "timed":
            time.sleep(plan.delay)
        else:
            msg = _receive(conn, proc, {"stalled", "done"}, _WAIT_S, log)
            stalled = msg[1] if msg is not None and msg[0] == "stalled" else None
    finally:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended on its own
            pass
        proc.join(_WAIT_S)
    _drain(conn, log)
    conn.close()
    run_ended = any(m[0] == "done" for m in log)
    acknowledged = {m[1] for m in log if m[0] == "written"} | set(range(plan.preseed))

    after_kill = _snapshot(folder)
    temps_after_kill = len(temp_files(folder))
    damaged = sum(1 for name, data in after_kill.items() if reference.pages.get(name) != data)
    present = {int(name[1:7]) for name in after_kill}
    lost = len(acknowledged - present)

    tokens, reused, temp_reads = call(ctx, _answering_child, str(folder))
    final = _snapshot(folder)
    ends = [min((i + 1) * page, reference.boundary) for i in range(len(reference.pages))]
    return TrialResult(
        plan=plan,
        run_ended=run_ended,
        stalled_at=stalled,
        acknowledged=len(acknowledged),
        pages_after_kill=len(after_kill),
        temps_after_kill=temps_after_kill,
        reused_tokens=reused,
        reused_pages=sum(end <= reused for end in ends),
        expected_reuse=_covered(present, reference.boundary, page),
        correct=tokens == reference.tokens,
        lost_pages=lost,
        damaged_pages=damaged,
        temp_reads=temp_reads,
        temps_left=len(temp_files(folder)),
        final_pages_ok=final == reference.pages,
    )


def run(workdir: Path, *, trials: int = 24, seed: int = 0, page: int = 16, progress=None) -> Kill9Figures:
    """Run ``trials`` kill -9 trials in folders under ``workdir``; returns the figures."""
    t0 = time.perf_counter()
    ctx = process_context()
    reference = reference_run(ctx, workdir / "reference")
    plans = make_plans(trials, seed, len(reference.pages), reference.run_s)
    results = []
    for plan in plans:
        results.append(run_trial(ctx, plan, workdir / f"trial-{plan.trial:03d}", reference, page))
        if progress is not None:
            progress(results[-1])
    return Kill9Figures(
        trials=len(results),
        modes=dict(Counter(r.plan.mode for r in results)),
        kills_during_run=sum(not r.run_ended for r in results),
        kills_inside_page_writes=sum(r.temps_after_kill > 0 for r in results),
        pages_acknowledged=sum(r.acknowledged for r in results),
        pages_reused=sum(r.reused_pages for r in results),
        answers_checked=len(results),
        wrong_answers=sum(not r.correct for r in results),
        lost_pages=sum(r.lost_pages for r in results) + sum(r.reused_tokens < r.expected_reuse for r in results),
        damaged_pages=sum(r.damaged_pages for r in results),
        temporary_files_read=sum(len(r.temp_reads) for r in results),
        temporary_files_left=sum(r.temps_left for r in results),
        seconds=round(time.perf_counter() - t0, 1),
        results=results,
    )
