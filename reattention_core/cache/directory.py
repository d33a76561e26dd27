"""The folder of the disk cache: its layout, locking, manifests and eviction.

`CacheDirectory` holds the rules every process sharing the folder follows; the page files in it are
`reattention_core.cache.page_file`'s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reattention_core.cache.fingerprint import FORMAT_VERSION, EngineFingerprint
from reattention_core.cache.page_file import PAGE_SUFFIX, page_name_parts
from reattention_core.safe_files import (
    abandoned,
    create_temporary,
    is_regular,
    make_private_dir,
    open_private,
    read_json,
)

try:  # POSIX; on other systems the cache still works for one process at a time
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("reattention")

ENV_DIR = "REATTENTION_CACHE_DIR"
ENV_MAX_BYTES = "REATTENTION_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 32 << 30
MANIFEST = "manifest.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
# Without flock (non-POSIX), temporary files older than this are leftovers of a killed process.
STALE_TMP_S = 3600.0
# The names this cache gives its folders; nothing else below its directory is touched.
_NAMESPACE_NAME = re.compile(r"[0-9a-f]{32}")


def default_cache_dir() -> Path:
    """``$REATTENTION_CACHE_DIR``, else ``$XDG_CACHE_HOME/reattention``, else ``~/.cache/reattention``."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "reattention"


def parse_bytes(value: str | int) -> int:
    """``123``, ``"64G"``, ``"500M"``, ``"1.5T"`` -> bytes (binary units).

    Raises:
        TypeError: neither an int nor a string.
        ValueError: a string that is no byte count.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(f"a byte count must be an int or a string like '64G', got {type(value).__name__}")
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except OverflowError:  # "infG"
        raise ValueError(f"not a byte count: {value!r}") from None


def default_max_bytes() -> int:
    """``$REATTENTION_CACHE_MAX_BYTES`` (e.g. ``64G``), else 32 GiB."""
    env = os.environ.get(ENV_MAX_BYTES)
    return parse_bytes(env) if env else DEFAULT_MAX_BYTES


def namespace_folders(directory: Path) -> list[Path]:
    """The namespace folders of a cache directory: real folders (not links) named like one."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if _NAMESPACE_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                found.append(Path(entry.path))
    return sorted(found)


def sweep_temporaries(folder: Path) -> int:
    """Delete the temporary files in ``folder`` whose writer is gone (`safe_files.abandoned`); returns how many.

    Hold `CacheDirectory.locked`: writers create their temporary files under it (see `safe_files`).
    """
    if folder.is_symlink():  # not this cache's folder: nothing in it is deleted
        return 0
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(TMP_PREFIX) and abandoned(entry.path, stale_s=STALE_TMP_S):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        log.info("prefix cache: removed %d temporary file(s) left in %s by a process that was killed", removed, folder)
    return removed


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CacheDirectory:
    """One cache folder shared by processes: locking, manifests, eviction.

    Layout (`default_cache_dir`): ``<dir>/.lock`` (flock'ed for manifest writes, eviction, clearing),
    ``<dir>/<namespace>/manifest.json`` (the fingerprint components of its pages) and
    ``<dir>/<namespace>/p000012-<key>.safetensors`` (page files); ``namespace`` is the first 32 hex
    digits of the engine fingerprint's root. Page files appear atomically and never change, so readers
    take no lock; manifest writes, eviction and clearing take an exclusive ``flock`` on ``<dir>/.lock``.
    Page files stay under ``max_bytes`` by deleting the least recently used (mtime is the last use;
    within one prompt deeper pages count as older, so a chain is cut from its end).

    Private, and only its own files: folders ``0700``, files ``0600`` (pages derive from the user's
    documents); it reads, evicts and deletes only regular files named like its pages, manifests and
    temporaries, in folders named like namespaces, and never follows a link below the directory. A
    temporary file nobody holds a ``flock`` on is a killed writer's leftover (`sweep_temporaries`).

    Args:
        directory: the folder (created on first write).
        max_bytes: size cap for all page files in ``directory``.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir = Path(directory).expanduser()
        self.max_bytes = int(max_bytes)
        self._manifest_ok: set[str] = set()
        self._explained: set[str] = set()
        self._estimate: int | None = None  # running total of page bytes (rescanned under the lock)

    def namespace_dir(self, fp: EngineFingerprint) -> Path:
        return self.dir / fp.namespace

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive inter-process lock on the cache directory."""
        make_private_dir(self.dir)
        with open_private(self.dir / LOCK) as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _manifest_body(self, fp: EngineFingerprint) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "fingerprint": fp.root,
            "components": fp.components,
            "model_name": fp.model_name,
            "details": fp.details,
        }

    def ensure_manifest(self, fp: EngineFingerprint) -> Path:
        """Create (or repair) the manifest of ``fp``'s namespace; returns the namespace folder."""
        ns = self.namespace_dir(fp)
        if fp.root in self._manifest_ok and is_regular(ns / MANIFEST):
            return ns
        with self.locked():
            if ns.is_symlink():
                raise OSError(errno.ELOOP, "the namespace folder is a symbolic link (not followed)", str(ns))
            make_private_dir(ns)
            path = ns / MANIFEST
            reason = None
            if os.path.lexists(path):
                try:
                    data = read_json(path)
                    if not isinstance(data, dict):
                        reason = "it is not a JSON object"
                    elif data.get("fingerprint") != fp.root or data.get("format") != FORMAT_VERSION:
                        reason = "it names another fingerprint"
                except (OSError, ValueError) as exc:
                    reason = f"it is unreadable ({exc})"
            else:
                reason = "missing"
            if reason is not None:
                if reason != "missing":
                    log.warning("prefix cache: rewriting manifest %s: %s", path, reason)
                self._atomic_write_bytes(path, json.dumps(self._manifest_body(fp), indent=1, default=str).encode())
        self._manifest_ok.add(fp.root)
        return ns

    def _atomic_write_bytes(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with create_temporary(tmp) as fh:  # renamed while still locked: never seen complete and unheld
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def explain_miss(self, fp: EngineFingerprint) -> None:
        """Log, once per fingerprint, why nothing under this fingerprint is on disk."""
        if fp.root in self._explained:
            return
        self._explained.add(fp.root)
        if is_regular(self.namespace_dir(fp) / MANIFEST):
            log.info("prefix cache: no page on disk for this prompt (fingerprint %s)", fp.namespace[:12])
            return
        others = []
        for folder in namespace_folders(self.dir):
            try:
                data = read_json(folder / MANIFEST)
            except (OSError, ValueError):
                continue
            comps = data.get("components") if isinstance(data, dict) else None
            if isinstance(comps, dict):
                others.append((fp.differences(comps), data, folder.name))
        if not others:
            log.info("prefix cache: %s holds no pages yet", self.dir)
            return
        diff, data, name = min(others, key=lambda o: len(o[0]))
        detail = _describe(diff, fp, data)
        log.info(
            "prefix cache miss: %d cached fingerprint(s) in %s do not match this engine; never loading them. "
            "The closest (%s, model %r) differs in %s",
            len(others),
            self.dir,
            name[:12],
            data.get("model_name", "?"),
            detail,
        )

    def _scan(self, sweep: bool = False) -> list[tuple[int, int, int, Path]]:
        """``(mtime_ns, -index, size, path)`` of every page file; ``sweep`` (under `locked`): also
        delete abandoned temporary files.

        Only regular files named like pages, in folders named like namespaces, count (see the class doc).
        """
        pages: list[tuple[int, int, int, Path]] = []
        for ns in namespace_folders(self.dir):
            if sweep:
                sweep_temporaries(ns)
            with contextlib.suppress(OSError):
                for entry in os.scandir(ns):
                    parts = page_name_parts(entry.name)
                    if parts is None:
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    pages.append((st.st_mtime_ns, -parts[0], st.st_size, Path(entry.path)))
        return pages

    def evict(self, pinned: set[str] | frozenset[str] = frozenset(), *, reserve: int = 0) -> bool:
        """Delete least recently used pages until the total plus ``reserve`` bytes fits ``max_bytes``.

        Pages whose key is in ``pinned`` are kept. Returns whether it now fits.
        """
        with self.locked():
            pages = self._scan(sweep=True)
            total = sum(p[2] for p in pages)
            removed = 0
            if total + reserve > self.max_bytes:
                for _mtime, _neg, size, path in sorted(pages):
                    if total + reserve <= self.max_bytes:
                        break
                    if path.name[: -len(PAGE_SUFFIX)].split("-", 1)[-1] in pinned:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    total -= size
                    removed += 1
            self._estimate = total
        if removed:
            log.info("prefix cache: evicted %d page(s) to keep %s under %d bytes", removed, self.dir, self.max_bytes)
        return total + reserve <= self.max_bytes

    def clear(self, fp: EngineFingerprint | None = None) -> int:
        """Delete the pages (and manifest) of ``fp``, or of every fingerprint; returns files deleted.

        Only this cache's own files go: page files, manifests and abandoned temporary files, in
        namespace folders that are not links (other files in the folder are left alone).
        """
        if not self.dir.is_dir():
            return 0
        removed = 0
        with self.locked():
            folders = namespace_folders(self.dir)
            if fp is not None:
                folders = [ns for ns in folders if ns.name == fp.namespace]
            for ns in folders:
                sweep_temporaries(ns)
                for entry in os.scandir(ns):
                    if page_name_parts(entry.name) is not None or entry.name == MANIFEST:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)  # a link is removed, never what it points to
                            removed += 1
            self._estimate = None
        self._manifest_ok.clear()
        self._explained.clear()
        return removed


def _describe(diff: list[str], fp: EngineFingerprint, data: dict[str, Any]) -> str:
    if not diff:
        return "nothing recorded (an older format?)"
    parts = []
    theirs = data.get("components") or {}
    details = data.get("details")
    their_details = details if isinstance(details, dict) else {}
    for name in diff:
        if name == "config":
            a, b = their_details.get("config") or {}, fp.details.get("config") or {}
            a = a if isinstance(a, dict) else {}
            fields = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            parts.append("config" + (f" ({', '.join(fields)})" if fields else ""))
        elif name in ("model", "tokenizer"):
            parts.append(f"{name} ({str(theirs.get(name))[:8]} -> {fp.components.get(name, '')[:8]})")
        else:
            parts.append(f"{name} ({theirs.get(name)!r} -> {fp.components.get(name)!r})")
    return ", ".join(parts)
