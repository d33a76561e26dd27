"""A really full disk: the cache folder and the offload spill folder on a small filesystem.

`small_filesystem` mounts a tmpfs of a few hundred KiB (as root; the tmpfs is private to the
test and unmounted in a ``finally``). Where mounting is refused (not root, no ``CAP_SYS_ADMIN``,
no ``mount``), it falls back to ``RLIMIT_FSIZE`` in the child processes (every file larger than
the limit fails with ``EFBIG``, which is what a full disk looks like to a single file) and says
so: `FullDiskFigures.filesystem` is ``"tmpfs"`` or ``"rlimit"``.

**Prefix cache.** A filler file leaves room for about a dozen pages, and a child process answers
over two corpora of about 63 and 38 pages. Checked: both answers equal the cold ones; one
warning for the whole process; every page file on disk is byte-identical to an unconstrained
run's (no partial page) and no temporary file is left. Then the filler is deleted (space
returns): a fresh process restores the pages that were written and writes the rest; a third
restores both corpora whole. With the tmpfs, the filesystem is then remounted read-only: a fresh
process still restores from it and answers a third corpus correctly with one warning.

**Offload spill folder.** An engine whose store lives in memory-mapped spill files
(``OffloadConfig(spill_dir=...)``) on the full filesystem: the spill folder exists because the
store does not fit in memory, so the engine does not quietly fall back to RAM. Checked: a
`StoreMemoryError` that says what to do, raised before anything is written, no file left in the
spill folder, and once space returns the same engine answers exactly as a resident engine does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.faults.common import (
    QUESTION,
    call,
    child_setup,
    corpus,
    page_files,
    process_context,
    receive,
    start,
    temp_files,
    tiny_engine,
)

CORPORA = {"a": corpus(1000, seed=33), "b": corpus(600, seed=34), "c": corpus(500, seed=35)}
NEW_TOKENS = 8
TMPFS_BYTES = 2 << 20
ROOM_PAGES = 12  # pages that fit beside the filler
_WAIT_S = 120.0
ENV_NO_MOUNT = "REATTENTION_FAULTS_NO_MOUNT"  # set: use the RLIMIT_FSIZE fallback even as root


@dataclass
class FullDiskFigures:
    filesystem: str  # "tmpfs" or "rlimit"
    answers_checked: int
    wrong_answers: int
    pages_written_until_full: int
    warnings_while_full: int
    full_warning: str
    partial_pages: int  # page files on disk that differ from an unconstrained run's, at any point
    temporary_files_left: int
    pages_restored_after_space_returned: int
    pages_written_after_space_returned: int
    complete_after_space_returned: bool  # the folder then holds every page of both corpora
    read_only_answers_ok: bool | None  # None: not run (no tmpfs to remount)
    read_only_warnings: int | None
    spill_error: str  # the StoreMemoryError's message
    spill_files_left: int
    spill_answer_after_space_returned_ok: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the small filesystem -------------------------------------------------------------------------


def _mount(path: Path, size: int) -> bool:
    if os.environ.get(ENV_NO_MOUNT):
        return False
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True, timeout=30)


def _unmount(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(args, capture_output=True, timeout=30, check=False).returncode == 0:
                return


@contextlib.contextmanager
def small_filesystem(path: Path, size: int = TMPFS_BYTES) -> Iterator[str]:
    """Mount a ``size``-byte tmpfs on ``path`` (``"tmpfs"``), or yield ``"rlimit"`` where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount(path, size):
        yield "rlimit"
        return
    try:
        yield "tmpfs"
    finally:
        _unmount(path)


def fill(path: Path, leave: int) -> Path:
    """A filler file taking all of ``path``'s filesystem but about ``leave`` bytes."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    filler = path / "filler.bin"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


# -- children -------------------------------------------------------------------------------------


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _limit_files(limit: int | None) -> None:
    if limit is not None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))


def _cold_child(conn, names: list[str]) -> None:
    child_setup()
    engine = tiny_engine(None, cache=False)
    conn.send(
        {
            n: list(engine.generate(QUESTION, context=CORPORA[n], max_new_tokens=NEW_TOKENS, progress=False).token_ids)
            for n in names
        }
    )


def _cache_child(conn, folder: str, names: list[str], limit: int | None) -> None:
    """Answer over each corpus in turn with the cache in ``folder``; report answers and warnings."""
    child_setup()
    _limit_files(limit)
    caught = _Warnings()
    logging.getLogger("reattention").addHandler(caught)
    engine = tiny_engine(folder)
    out = {}
    for name in names:
        r = engine.generate(QUESTION, context=CORPORA[name], max_new_tokens=NEW_TOKENS, progress=False)
        out[name] = (list(r.token_ids), r.cached_tokens)
    conn.send((out, caught.messages))


def _spill_child(conn, spill: str, limit: int | None) -> None:
    """Generate with the store in spill files: once on the full disk, then (told space is back) again."""
    child_setup()
    from reattention_core import OffloadConfig, StoreMemoryError

    _limit_files(limit)
    engine = tiny_engine(None, cache=False, offload=OffloadConfig(spill_dir=spill, pin=False))
    try:
        r = engine.generate(QUESTION, context=CORPORA["a"], max_new_tokens=NEW_TOKENS, progress=False)
        first: Any = ("answered", list(r.token_ids))
    except StoreMemoryError as exc:
        first = ("StoreMemoryError", str(exc))
    conn.send((first, sorted(os.listdir(spill))))
    conn.recv()  # space is back
    if limit is not None:
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    r = engine.generate(QUESTION, context=CORPORA["a"], max_new_tokens=NEW_TOKENS, progress=False)
    conn.send((list(r.token_ids), sorted(os.listdir(spill))))


# -- the scenario ---------------------------------------------------------------------------------


def _pages(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in page_files(folder)}


def _covered(pages: dict[str, bytes], reference: dict[str, bytes], boundary: int, page: int) -> int:
    """Tokens covered by the consecutive pages 0.. of one corpus (``reference``) found in ``pages``."""
    indices = {int(name[1:7]) for name in pages if name in reference}
    k = 0
    while k in indices:
        k += 1
    return min(k * page, boundary)


def run(workdir: Path) -> FullDiskFigures:
    t0 = time.perf_counter()
    ctx = process_context()
    cold = call(ctx, _cold_child, ["a", "b", "c"])
    refs = {}  # corpus -> its pages, from an unconstrained run
    for name in ("a", "b", "c"):
        call(ctx, _cache_child, str(workdir / f"reference-{name}"), [name], None)
        refs[name] = _pages(workdir / f"reference-{name}")
    reference = {k: v for pages in refs.values() for k, v in pages.items()}
    page_bytes = max(len(b) for b in reference.values())
    checked = wrong = 0

    def check(answers: dict[str, tuple[list[int], int]]) -> None:
        nonlocal checked, wrong
        for name, (tokens, _cached) in answers.items():
            checked += 1
            wrong += tokens != cold[name]

    def partial(folder: Path) -> int:
        return sum(reference.get(name) != data for name, data in _pages(folder).items())

    small = workdir / "small"
    with small_filesystem(small) as filesystem:
        limit = None if filesystem == "tmpfs" else page_bytes // 2
        cache_dir, spill_dir = small / "cache", small / "spill"
        cache_dir.mkdir()
        spill_dir.mkdir()
        filler = fill(small, ROOM_PAGES * (page_bytes + 4096)) if filesystem == "tmpfs" else None

        # 1. the cache on the full disk
        answers, full_warnings = call(ctx, _cache_child, str(cache_dir), ["a", "b"], limit)
        check(answers)
        while_full = _pages(cache_dir)
        partials, temps = partial(cache_dir), len(temp_files(cache_dir))

        # 2. the spill folder on the full disk; space returns while that engine waits
        proc, conn = start(ctx, _spill_child, str(spill_dir), limit, duplex=True)
        try:
            (kind, detail), spill_left = receive(proc, conn, _WAIT_S)
            if filler is not None:
                filler.unlink()  # space returns
            conn.send("go")
            spill_tokens, spill_after = receive(proc, conn, _WAIT_S)
        finally:
            proc.join(_WAIT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        checked += 1
        wrong += spill_tokens != cold["a"]

        # 3. space is back: a fresh process restores what was written and writes the rest
        back, back_warnings = call(ctx, _cache_child, str(cache_dir), ["a", "b"], None)
        check(back)
        after_back = _pages(cache_dir)
        partials += partial(cache_dir)
        final, final_warnings = call(ctx, _cache_child, str(cache_dir), ["a", "b"], None)
        check(final)
        boundary = {n: final[n][1] for n in final}
        restored_ok = all(back[n][1] == _covered(while_full, refs[n], boundary[n], 16) for n in back)
        complete = _pages(cache_dir) == {**refs["a"], **refs["b"]} and not back_warnings and not final_warnings
        complete = complete and restored_ok and all(final[n][1] == _covered(refs[n], refs[n], 10**9, 16) for n in final)
        temps += len(temp_files(cache_dir))

        # 4. (tmpfs) the filesystem turns read-only
        ro_ok = ro_warnings = None
        if filesystem == "tmpfs":
            _remount(small, "ro")
            try:
                ro, ro_messages = call(ctx, _cache_child, str(cache_dir), ["a", "c"], None)
            finally:
                _remount(small, "rw")
            check(ro)
            ro_ok = all(ro[n][0] == cold[n] for n in ("a", "c")) and ro["a"][1] == boundary["a"]
            ro_warnings = len(ro_messages)
            partials += partial(cache_dir)

    return FullDiskFigures(
        filesystem=filesystem,
        answers_checked=checked,
        wrong_answers=wrong,
        pages_written_until_full=len(while_full),
        warnings_while_full=len(full_warnings),
        full_warning=full_warnings[0] if full_warnings else "",
        partial_pages=partials,
        temporary_files_left=temps,
        pages_restored_after_space_returned=sum(back[n][1] for n in back) // 16 if restored_ok else -1,
        pages_written_after_space_returned=len(after_back) - len(while_full),
        complete_after_space_returned=complete,
        read_only_answers_ok=ro_ok,
        read_only_warnings=ro_warnings,
        spill_error=detail if kind == "StoreMemoryError" else f"no error: {kind}",
        spill_files_left=len(spill_left) + len(spill_after),
        spill_answer_after_space_returned_ok=spill_tokens == cold["a"],
        seconds=round(time.perf_counter() - t0, 1),
    )
