"""The disk cache: pages saved as prefill completes them and loaded, verified, for later prompts.

`DiskCache` is a `CacheDirectory` (`reattention_core.cache.directory`) that writes and reads page files
(`reattention_core.cache.page_file`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from reattention_core.cache.directory import TMP_PREFIX, CacheDirectory, fsync_dir, sweep_temporaries
from reattention_core.cache.fingerprint import FORMAT_VERSION, EngineFingerprint
from reattention_core.cache.page_file import (
    PAGE_SUFFIX,
    PageRef,
    page_file_name,
    page_metadata,
    read_page,
    write_page_file,
)
from reattention_core.errors import PageError, PageMissing
from reattention_core.safe_files import create_temporary, is_regular

log = logging.getLogger("reattention")

# Why a page write failed, in words, for the errors a full or constrained disk gives.
_WRITE_HINTS = {
    errno.ENOSPC: " (the disk is full)",
    errno.EDQUOT: " (the disk quota is used up)",
    errno.EFBIG: " (the file size limit is reached)",
    errno.EROFS: " (the file system is read-only)",
}


@dataclass(frozen=True)
class DiskStats:
    dir: str
    entries: int  # distinct cached prefixes (chain ends) of this fingerprint
    pages: int
    tokens: int
    bytes: int
    total_bytes: int  # all fingerprints in the directory (what the cap applies to)
    max_bytes: int


class DiskCache(CacheDirectory):
    """Pages of one or more engine fingerprints in one directory.

    Writes are atomic: a page goes to a temporary file (created under the directory lock, flock'ed
    until the rename), is fsync'ed and renamed over its final name, then the folder is fsync'ed; a
    crash or full disk never leaves a half page under a page name, and concurrent writers of one page
    write identical bytes. Reads are verified (`page_file.read_page`) on a thread pool while earlier
    pages are copied into the store; a page that fails a check is logged, deleted and recomputed. A
    write first evicts least recently used pages as the cap requires, never those of the prompt being
    processed; if that prompt alone outgrows the cap, its remaining pages are not written.

    Args:
        directory: the cache directory (created on first write).
        max_bytes: size cap for all page files in ``directory``.
        workers: threads verifying checksums while pages load.
    """

    def __init__(self, directory: str | Path, max_bytes: int, *, workers: int | None = None) -> None:
        super().__init__(directory, max_bytes)
        self.workers = workers or max(1, min(16, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._warned_write = False
        self._swept: set[str] = set()  # namespaces whose leftover temporary files this process removed

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
                write_page_file(fh, keys, values, meta)
                written = os.fstat(fh.fileno()).st_size
                os.replace(tmp, ref.path)
            tmp = None
            fsync_dir(ns)
        except Exception as exc:  # noqa: BLE001 - a cache must never break generation
            if not self._warned_write:
                self._warned_write = True
                hint = _WRITE_HINTS.get(exc.errno or 0, "") if isinstance(exc, OSError) else ""
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
                window.append((ref, pool.submit(read_page, ref, *args)))
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
                    window.append((nxt, pool.submit(read_page, nxt, *args)))
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
