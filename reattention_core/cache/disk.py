"""The on-disk page store of the prefix cache: safetensors files, atomic, checksummed, shared.

Layout of the cache directory (`default_cache_dir`)::

    <dir>/.lock                                  flock'ed for manifest writes, eviction, clearing
    <dir>/<namespace>/manifest.json              the fingerprint components of every page below
    <dir>/<namespace>/p000012-<key>.safetensors  one page: keys and values of all layers

``namespace`` is the first 32 hex digits of the engine fingerprint's root (model weights,
tokenizer, ReAttention config, dtype, device type, kernel backend, page size, format version; see
`reattention_core.cache.fingerprint`), and ``key`` the page's hash-chain key, which already depends on
that root. A page file is a safetensors file holding tensors ``k.<layer>`` and ``v.<layer>``
(``[T, H, D]``, pre-RoPE keys and values; ``T`` is ``page_size``, or less for the tail page that
ends a corpus) laid out ``k.0 .. k.{L-1}, v.0 .. v.{L-1}`` back to back, so its data section is
the bytes of one ``[2, L, T, H, D]`` tensor; its metadata holds the format version, the
fingerprint root, its key, its parent's key, its index in the chain, its token count and the
CRC-32 of the data section.

Guarantees:

* **Atomic writes**: a page is written to a temporary file in the same folder, fsync'ed and
  renamed over its final name (then the folder is fsync'ed), so a crash, Ctrl-C or a full disk
  never leaves a half page under a page name. The writer creates its temporary file under the
  directory lock and holds an exclusive ``flock`` on it until the rename, so a temporary file
  nobody holds is the leftover of a killed process: the next process to read or write that
  folder deletes it (`sweep_temporaries`, under the directory lock).
* **Private, and only its own files**: the folders it creates are ``0700`` and its files ``0600``
  (pages hold what a model computed from the user's documents). It reads, evicts and deletes only
  regular files named like its pages (``p<6 digits>-<64 hex>.safetensors``), its manifests and its
  temporary files, in folders named like namespaces (32 hex digits), and never follows a symbolic
  link below the cache directory: a link in place of a page is a bad page (dropped, not read), a
  linked folder is not its own (left alone), so files outside the cache are never read or deleted.
* **Verified reads**: files are memory-mapped (private mappings; for a GPU store they are read
  straight into pinned staging buffers instead, one ``readinto`` per file); the header must parse,
  cover the file exactly, name the expected fingerprint, key, parent and index, describe every
  tensor with the expected dtype, shape and place, and the data section must have the recorded
  CRC-32 (zlib; about 2 GB/s per core, computed on a thread pool while earlier pages are being
  copied into the store; one call per page, so the threads hardly contend for the GIL). A page
  that fails any check is logged (warning, with the reason), deleted and recomputed.
* **Shared by processes**: page files appear atomically and are never modified, so readers need no
  lock; manifest writes, eviction and clearing take an exclusive ``fcntl.flock`` on ``<dir>/.lock``.
  Two processes writing the same page write identical bytes; the last rename wins.
* **Size cap, LRU**: after writes, the total size of all page files is kept under ``max_bytes``
  by deleting the least recently used pages (a page's mtime is its last use; within one prompt
  the deeper pages count as older, so a chain is cut from its end and its prefix stays usable).
  Pages of the prompt being processed are never evicted for it; if that prompt alone outgrows the
  cap, its remaining pages are not written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from reattention_core.cache.fingerprint import FORMAT_VERSION, EngineFingerprint
from reattention_core.safe_files import (
    abandoned,
    create_temporary,
    is_regular,
    loads_json,
    make_private_dir,
    open_private,
    open_regular,
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
PAGE_SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
# Without flock (non-POSIX), temporary files older than this are leftovers of a killed process.
STALE_TMP_S = 3600.0
# The names this cache gives its folders and pages; nothing else below its directory is touched.
_NAMESPACE_NAME = re.compile(r"[0-9a-f]{32}")
_PAGE_NAME = re.compile(r"p(\d{6,})-([0-9a-f]{64})\.safetensors")
# Largest safetensors header accepted, and the bytes read at first hoping to cover it.
_MAX_HEADER = 100 << 20
_HEADER_GUESS = 64 << 10


# Why a page write failed, in words, for the errors a full or constrained disk gives.
_WRITE_HINTS = {
    errno.ENOSPC: " (the disk is full)",
    errno.EDQUOT: " (the disk quota is used up)",
    errno.EFBIG: " (the file size limit is reached)",
    errno.EROFS: " (the file system is read-only)",
}


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


def page_file_name(index: int, key: str) -> str:
    return f"p{index:06d}-{key}{PAGE_SUFFIX}"


def page_name_parts(name: str) -> tuple[int, str] | None:
    """``(index, key)`` of a page file name, or ``None`` for any other name."""
    m = _PAGE_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


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

    Hold `DiskCache.locked`: writers create their temporary files under it (see `safe_files`).
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


class PageError(Exception):
    """A page file failed verification (the message says how)."""


class PageMissing(Exception):
    """A page file is not there (a plain miss: nothing to warn about)."""


@dataclass(frozen=True)
class PageRef:
    """Where one page of a prompt's chain lives and what it must contain."""

    path: Path
    key: str
    parent: str
    index: int
    tokens: int  # tokens it holds: the page size, or fewer for a corpus's tail page


@dataclass(frozen=True)
class DiskStats:
    dir: str
    entries: int  # distinct cached prefixes (chain ends) of this fingerprint
    pages: int
    tokens: int
    bytes: int
    total_bytes: int  # all fingerprints in the directory (what the cap applies to)
    max_bytes: int


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_header(path: Path) -> dict[str, Any]:
    """A page file's safetensors header (`ValueError` if unreadable; `OSError` for a link or non-file)."""
    with os.fdopen(open_regular(path), "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER:
            raise ValueError("header too large")
        header = loads_json(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")  # noqa: TRY004 - a parse error, as json.loads raises
    return header


class DiskCache:
    """Pages of one or more engine fingerprints in one directory (see the module doc).

    Args:
        directory: the cache directory (created on first write).
        max_bytes: size cap for all page files in ``directory``.
        workers: threads verifying checksums while pages load.
    """

    def __init__(self, directory: str | Path, max_bytes: int, *, workers: int | None = None) -> None:
        self.dir = Path(directory).expanduser()
        self.max_bytes = int(max_bytes)
        self.workers = workers or max(1, min(16, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._manifest_ok: set[str] = set()
        self._explained: set[str] = set()
        self._estimate: int | None = None  # running total of page bytes (rescanned under the lock)
        self._warned_write = False
        self._swept: set[str] = set()  # namespaces whose leftover temporary files this process removed

    # -- paths, lock, manifest ---------------------------------------------------------------

    def namespace_dir(self, fp: EngineFingerprint) -> Path:
        return self.dir / fp.namespace

    def refs(self, fp: EngineFingerprint, keys: Sequence[str], ends: Sequence[int], start: int = 0) -> list[PageRef]:
        """`PageRef` of pages ``start ..`` of a chain with ``keys`` (page ``i`` ends at token ``ends[i]``)."""
        ns = self.namespace_dir(fp)
        return [
            PageRef(
                ns / page_file_name(i, keys[i]),
                keys[i],
                keys[i - 1] if i else fp.root,
                i,
                ends[i] - (ends[i - 1] if i else 0),
            )
            for i in range(start, len(keys))
        ]

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
            _fsync_dir(path.parent)
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

    # -- writing ---------------------------------------------------------------------------

    def save(
        self,
        fp: EngineFingerprint,
        ref: PageRef,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        *,
        pinned: set[str] | frozenset[str] = frozenset(),
    ) -> str:
        """Write one page atomically, evicting older pages first if the cap requires it.

        ``keys[l]``/``values[l]``: ``[T, H, D]`` tensors of layer ``l`` (any device).

        Returns:
            ``"written"``; ``"exists"`` (already on disk, left as it is); ``"cap"`` (it would not
            fit under ``max_bytes`` even after evicting every page not in ``pinned``); or
            ``"error"`` (the write failed, e.g. a full disk; logged once, nothing left behind).
        """
        if is_regular(ref.path):
            return "exists"
        size = sum(t.numel() * t.element_size() for t in (*keys, *values)) + 8192
        over = self._estimate is None or self._estimate + size > self.max_bytes
        tmp = None
        try:
            if over and not self.evict(pinned, reserve=size):
                return "cap"
            ns = self.ensure_manifest(fp)
            meta = {
                "format": str(FORMAT_VERSION),
                "fingerprint": fp.root,
                "key": ref.key,
                "parent": ref.parent,
                "index": str(ref.index),
            }
            tmp = ns / f"{TMP_PREFIX}{ref.key[:16]}-{os.getpid()}-{secrets.token_hex(4)}{PAGE_SUFFIX}"
            with self.locked():  # no sweeper may see it before it is locked
                fh = create_temporary(tmp)
            with fh:  # locked until renamed: a sweeper never takes it for a leftover
                _write_page_file(fh, keys, values, meta)
                written = os.fstat(fh.fileno()).st_size
                os.replace(tmp, ref.path)
            tmp = None
            _fsync_dir(ns)
        except Exception as exc:  # noqa: BLE001 - a cache must never break generation
            if not self._warned_write:
                self._warned_write = True
                hint = _WRITE_HINTS.get(exc.errno, "") if isinstance(exc, OSError) else ""
                log.warning(
                    "prefix cache: could not write %s%s: %s; pages are kept in memory only. Free space, "
                    "lower the cap or set another cache directory (REATTENTION_CACHE_DIR)",
                    ref.path,
                    hint,
                    exc,
                )
            return "error"
        finally:
            if tmp is not None:  # also on KeyboardInterrupt: never leave a temporary file behind
                with contextlib.suppress(OSError):
                    tmp.unlink()
        if self._estimate is not None:
            self._estimate += written
        return "written"

    # -- reading ---------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="reattention-cache")
            return self._pool

    def load(
        self,
        fp: EngineFingerprint,
        refs: Sequence[PageRef],
        *,
        num_layers: int,
        dtype: torch.dtype,
        pin: bool = False,
        kv_shape: tuple[int, int] | None = None,
    ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Yield the verified ``(keys, values)`` of consecutive pages of ``refs`` until one is missing or bad.

        ``kv_shape``: ``(H, D)``, the KV heads and head dim every page tensor must have.

        Tensors are ``[ref.tokens, H, D]`` CPU views of the memory-mapped file (``pin=True``: copies
        in pinned memory, made on the worker threads, for fast copies to a GPU). They own their memory:
        a mapped view stays valid and unchanged after the file is evicted (a private mapping of
        the deleted file), so a store may keep them instead of copying them out
        (`reattention_core.store.offloaded.OffloadedStore.adopt`). A bad page (any failure to read or
        verify it) is logged, deleted and ends the iteration.
        """
        if not refs:
            return
        ns = refs[0].path.parent
        if ns.is_symlink():
            if fp.namespace not in self._swept:
                self._swept.add(fp.namespace)
                log.warning("prefix cache: %s is a symbolic link; not following it (remove it to cache there)", ns)
            return
        if fp.namespace not in self._swept and ns.is_dir():  # leftovers of a killed writer, once per process
            self._swept.add(fp.namespace)
            with contextlib.suppress(OSError), self.locked():
                sweep_temporaries(ns)
        count = 0
        for ref in refs:
            if not os.path.lexists(ref.path):  # anything under a page's name is read (and checked)
                break
            count += 1
        if count == 0:
            if refs and refs[0].index == 0:
                self.explain_miss(fp)
            return
        pool = self._executor()
        window: deque[tuple[PageRef, Future]] = deque()
        todo = iter(refs[:count])
        args = (fp.root, num_layers, dtype, pin, kv_shape)
        try:
            for ref in todo:
                window.append((ref, pool.submit(_read_page, ref, *args)))
                if len(window) > self.workers:
                    break
            while window:
                ref, fut = window.popleft()
                try:
                    page = fut.result()
                except PageMissing:  # evicted by another process meanwhile: a plain miss
                    return
                except PageError:
                    raise
                except Exception as exc:  # whatever a crafted file provokes, it is a bad page
                    raise PageError(f"unreadable ({type(exc).__name__}: {exc})", str(ref.path)) from exc
                nxt = next(todo, None)
                if nxt is not None:
                    window.append((nxt, pool.submit(_read_page, nxt, *args)))
                yield page
        except PageError as exc:
            reason, path = exc.args
            log.warning("prefix cache: dropping %s: %s; it will be recomputed", path, reason)
            with contextlib.suppress(OSError):
                Path(path).unlink()  # a link is removed, never what it points to
        finally:
            for _ref, fut in window:
                fut.cancel()

    def touch(self, refs: Sequence[PageRef]) -> None:
        """Mark pages as just used; deeper pages of the chain get slightly older times."""
        now = time.time_ns()
        for ref in refs:
            t = now - ref.index * 1000
            with contextlib.suppress(OSError, NotImplementedError):
                os.utime(ref.path, ns=(t, t), follow_symlinks=False)

    # -- size cap, info, clearing -------------------------------------------------------------

    def _scan(self, sweep: bool = False) -> list[tuple[int, int, int, Path]]:
        """``(mtime_ns, -index, size, path)`` of every page file; ``sweep`` (under `locked`): also
        delete abandoned temporary files.

        Only regular files named like pages, in folders named like namespaces, count (see the module doc).
        """
        pages = []
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
                    if path.name[:-len(PAGE_SUFFIX)].split("-", 1)[-1] in pinned:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    total -= size
                    removed += 1
            self._estimate = total
        if removed:
            log.info("prefix cache: evicted %d page(s) to keep %s under %d bytes", removed, self.dir, self.max_bytes)
        return total + reserve <= self.max_bytes

    def stats(self, fp: EngineFingerprint, page_size: int) -> DiskStats:
        ns = self.namespace_dir(fp)
        pages = self._scan()
        total = sum(p[2] for p in pages)
        mine = [p for p in pages if p[3].parent == ns]
        parents: set[str] = set()
        keys: set[str] = set()
        tokens = 0
        for _m, _i, _s, path in mine:
            keys.add(path.name[: -len(PAGE_SUFFIX)].split("-", 1)[-1])
            meta = page_metadata(path)
            if isinstance(meta.get("parent"), str):
                parents.add(meta["parent"])
            page_tokens = page_size  # tail pages are shorter: their header says by how much
            with contextlib.suppress(KeyError, TypeError, ValueError):
                page_tokens = int(meta["tokens"])
            tokens += page_tokens
        return DiskStats(
            dir=str(self.dir),
            entries=len(keys - parents),
            pages=len(mine),
            tokens=tokens,
            bytes=sum(p[2] for p in mine),
            total_bytes=total,
            max_bytes=self.max_bytes,
        )

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


def page_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a page file's header, or ``{}`` if it cannot be read (nothing is followed)."""
    try:
        meta = _read_header(path).get("__metadata__")
    except (OSError, ValueError, struct.error):
        return {}
    return meta if isinstance(meta, dict) else {}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _parse_header(raw: bytes, size: int, path: str) -> tuple[dict[str, Any], int]:
    """The safetensors header of a ``size``-byte page file from its first bytes ``raw``.

    Returns the parsed header and the offset of the data section.
    """
    if size < 8 or len(raw) < 8:
        raise PageError(f"truncated ({size} bytes)", path)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(size - 8, _MAX_HEADER):
        raise PageError(f"header length {n} does not fit a {size}-byte file", path)
    if len(raw) < 8 + n:
        raise PageError(f"truncated header ({len(raw) - 8} of {n} bytes)", path)
    if (8 + n) % 8:  # the writer pads the header so that the data section is aligned for any dtype
        raise PageError(f"header length {n} leaves the data section unaligned", path)
    try:
        header = loads_json(raw[8 : 8 + n])
    except ValueError as exc:
        raise PageError(f"unreadable header ({exc})", path) from exc
    if not isinstance(header, dict):
        raise PageError("unreadable header (not an object)", path)
    return header, 8 + n


def _map_page(path: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Memory-map a page file: its parsed safetensors header and its data section as uint8.

    The mapping is private (copy-on-write), so the tensors are writable views that can never
    change the file; pages are read from the page cache or the device as they are touched.
    """
    import mmap

    with os.fdopen(open_regular(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise PageError(f"truncated ({size} bytes)", path)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    (n,) = struct.unpack("<Q", mm[:8])
    header, offset = _parse_header(mm[: 8 + min(n, _MAX_HEADER)], size, path)
    data = torch.frombuffer(mm, dtype=torch.uint8, offset=offset)
    with contextlib.suppress(AttributeError, OSError):  # hint: the whole file is about to be read
        mm.madvise(mmap.MADV_WILLNEED)
    return header, data


def _staging_buffer(nbytes: int) -> torch.Tensor | None:
    """A pinned uint8 host buffer of ``nbytes`` (from PyTorch's caching host allocator), or ``None``."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:  # no CUDA, or no pinned memory to be had
        return None


def _read_page_pinned(path: str) -> tuple[dict[str, Any], torch.Tensor] | None:
    """Read a page file's data section straight into a pinned host buffer (for a GPU store).

    One ``readinto`` per file instead of mapping it and copying the mapping into pinned memory:
    that halves the host memory traffic and avoids a page fault per 4 KiB (about 2x faster on
    the machines measured). Returns ``None`` when no pinned memory can be had (the caller maps
    the file instead).
    """
    with os.fdopen(open_regular(path), "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(min(size, 8 + _HEADER_GUESS))
        if len(head) >= 8:
            (n,) = struct.unpack("<Q", head[:8])
            if len(head) < 8 + n <= min(size, 8 + _MAX_HEADER):  # a large header: read the rest of it
                head += fh.read(8 + n - len(head))
        header, offset = _parse_header(head, size, path)
        data = _staging_buffer(size - offset)
        if data is None:
            return None
        view = memoryview(data.numpy())
        view[: len(head) - offset] = head[offset:]
        done = len(head) - offset
        while done < len(view):  # regular files rarely return short reads, but they may
            got = fh.readinto(view[done:])
            if not got:
                raise PageError(f"truncated while reading ({offset + done} of {size} bytes)", path)
            done += got
    return header, data


def _read_page(
    ref: PageRef,
    root: str,
    num_layers: int,
    dtype: torch.dtype,
    pin: bool = False,
    kv_shape: tuple[int, int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Open, check and checksum one page (runs on the loader's thread pool).

    ``kv_shape``: the ``(H, D)`` every tensor must have (``None``: any, as long as all agree).

    Returns views of the memory-mapped file, or (``pin=True``) of one pinned host buffer that the
    data section was read into, ready for asynchronous copies to a GPU.
    """
    path = str(ref.path)
    try:
        opened = _read_page_pinned(path) if pin else None
        header, data = opened if opened is not None else _map_page(path)
    except FileNotFoundError as exc:
        raise PageMissing(path) from exc
    except (OSError, ValueError, struct.error) as exc:
        raise PageError(f"unreadable or truncated ({exc})", path) from exc
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise PageError("no metadata object in the header", path)
    expected = {f"{kind}.{i}" for kind in "kv" for i in range(num_layers)}
    if set(header) != expected:
        raise PageError(f"holds tensors {sorted(header)[:4]}..., expected k.0..k.{num_layers - 1}, v.*", path)
    checks = {
        "format": str(FORMAT_VERSION),
        "fingerprint": root,
        "key": ref.key,
        "parent": ref.parent,
        "index": str(ref.index),
        "tokens": str(ref.tokens),
    }
    for name, want in checks.items():
        if meta.get(name) != want:
            raise PageError(f"metadata {name}={meta.get(name)!r}, expected {want!r}", path)
    try:
        crc = int(meta["crc32"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PageError("no readable checksum", path) from exc
    # Layout checks before touching the data: dtype, shape, and the extents of `_page_layout`.
    shape = (ref.tokens, *_page_shape(header, path)[1:])
    if kv_shape is not None and shape[1:] != tuple(kv_shape):
        raise PageError(f"tensors of {shape[1:]} (heads, head dim), this model has {tuple(kv_shape)}", path)
    layout = _page_layout(num_layers, shape, dtype)
    for name, (begin, stop) in layout.items():
        info = header[name]
        try:
            t_dtype, t_shape = _SAFETENSORS_DTYPES.get(info["dtype"]), tuple(int(x) for x in info["shape"])
            extent = tuple(int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise PageError(f"malformed entry for {name}", path) from exc
        if t_dtype != dtype:
            raise PageError(f"{name} has dtype {info['dtype']}, expected {dtype}", path)
        if t_shape != shape:
            raise PageError(f"{name} has shape {t_shape}, expected {shape}", path)
        if extent != (begin, stop):
            raise PageError(f"{name} lies at bytes {extent}, expected {(begin, stop)}", path)
    if stop != data.numel():
        raise PageError(f"the data section has {data.numel()} bytes, the header describes {stop}", path)
    # One checksum over the whole data section: one call that releases the GIL, where one per
    # tensor made the loader threads queue for the GIL (about 5x slower restores at 16 threads).
    if zlib.crc32(data.numpy()) != crc:
        raise PageError("checksum mismatch (corrupted file)", path)
    both = data.view(dtype).view(2, num_layers, *shape)
    return list(both[0].unbind(0)), list(both[1].unbind(0))


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _page_layout(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Byte extents of a page's tensors in its data section: ``k.0 .. k.{L-1}``, then ``v.0 ..``.

    A fixed, contiguous layout (a valid safetensors file, whatever order its header lists),
    so the data section is the bytes of one ``[2, L, T, H, D]`` tensor.
    """
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    names = [f"{kind}.{i}" for kind in "kv" for i in range(num_layers)]
    return {name: (j * nbytes, (j + 1) * nbytes) for j, name in enumerate(names)}


def _page_shape(header: dict[str, Any], path: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in header["k.0"]["shape"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise PageError("malformed entry for k.0", path) from exc
    if len(shape) != 3 or min(shape) < 1:
        raise PageError(f"k.0 has shape {shape}", path)
    return shape


def _write_page_file(
    fh: BinaryIO, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], meta: dict[str, str]
) -> None:
    """Write one page (safetensors, `_page_layout`) with its token count and data CRC-32 in ``meta`` to ``fh``.

    The tensors (``[T, H, D]`` each, any device) are stacked where they live and copied to the
    host in one transfer; the file is written and fsync'ed (the caller renames it into place).
    """
    tensors = [t.detach() for t in (*keys, *values)]
    if len({t.device for t in tensors}) > 1:  # e.g. keys on the GPU, values in host memory (offload)
        tensors = [t.to("cpu") for t in tensors]
    both = torch.stack(tensors).to("cpu").contiguous()
    dtype, shape = both.dtype, tuple(both.shape[1:])
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"pages of dtype {dtype} are not supported (use float32, float16 or bfloat16)")
    data = both.view(torch.uint8).reshape(-1).numpy()
    header: dict[str, Any] = {
        name: {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": list(extent)}
        for name, extent in _page_layout(len(keys), shape, dtype).items()
    }
    header["__metadata__"] = {**meta, "tokens": str(shape[0]), "crc32": str(zlib.crc32(data))}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data section starts 8-byte aligned, as safetensors does
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    fh.write(memoryview(data))
    fh.flush()
    os.fsync(fh.fileno())


def _describe(diff: list[str], fp: EngineFingerprint, data: dict[str, Any]) -> str:
    if not diff:
        return "nothing recorded (an older format?)"
    parts = []
    theirs = data.get("components") or {}
    their_details = data.get("details") if isinstance(data.get("details"), dict) else {}
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
