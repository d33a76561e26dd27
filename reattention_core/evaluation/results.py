"""Result files: JSON lines appended one per finished cell, read back to resume and to report.

A row is written with a single ``write`` of one line and flushed, so an interrupted run (Ctrl-C,
a killed job) leaves whole rows only, plus at worst one torn last line, which `read_rows` skips.
A run holds its file (`ResultsFile.exclusive`), so two runs never compute and write the same cells.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from reattention_core.errors import InvalidInputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# The coordinates that identify a cell; two rows with the same key are the same measurement.
KEY_FIELDS: tuple[str, ...] = (
    "task", "haystack", "length", "depth", "index", "mode", "seed", "model", "jitter", "offload", "overrides",
    "yarn_factor",
)  # fmt: skip


def offload_tag(engine: Any) -> str | None:
    """What a row records of an approximate (budgeted) offload, ``None`` for exact selection."""
    off = getattr(engine, "offload", None)
    if off is None or off.exact:
        return None
    return f"block={off.block},budget={off.budget}"


def cell_key(row: dict[str, Any]) -> tuple:
    """The identity of a row's cell (see `KEY_FIELDS`); depths are rounded so floats compare."""
    out = []
    for name in KEY_FIELDS:
        value = row.get(name)
        if name == "model" and value is None:
            value = (row.get("env") or {}).get("model")
        if name == "jitter":  # rows written before the jitter existed had none
            value = float(value or 0.0)
        if name in ("offload", "overrides", "yarn_factor"):  # exact rows and the preset's (older rows too) have none
            value = value or None
        out.append(round(value, 6) if isinstance(value, float) else value)
    return tuple(out)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every complete row of a results file (a missing file has none; a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted write
    return rows


class ResultsFile:
    """Append-only JSON-lines results with the set of cells already done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.done: set[tuple] = {cell_key(r) for r in read_rows(self.path)}

    def __contains__(self, row_or_key: Any) -> bool:
        key = row_or_key if isinstance(row_or_key, tuple) else cell_key(row_or_key)
        return key in self.done

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, sort_keys=False, default=str) + "\n"
        # A torn last line from an earlier crash must not swallow this row: start on a fresh line.
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if needs_newline else "") + line)
            f.flush()
            os.fsync(f.fileno())
        self.done.add(cell_key(row))

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.path)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the file for one run: a second run on the same file (another process, or another
        run in this one) is refused, instead of both computing the same cells and writing them
        twice. The set of finished cells is re-read once the file is held."""
        if fcntl is None:  # pragma: no cover - no advisory locks on this platform
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InvalidInputError(
                    f"another run is writing to {self.path}: wait for it to finish (then rerun to resume) "
                    "or give this run another --out"
                ) from None
            try:
                self.done = {cell_key(r) for r in read_rows(self.path)}
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def iter_rows(paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    for p in paths:
        yield from read_rows(p)
