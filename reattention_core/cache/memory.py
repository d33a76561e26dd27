"""`MemoryCache`: the stores of recently prefilled prompts, kept in memory as segments.

A segment is a store and the keys of the pages it holds; how prompts borrow, truncate or copy a
segment is `MemoryCache`'s doc.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reattention_core.store import CachedStore, ResidentStore

log = logging.getLogger("reattention")


@dataclass(frozen=True)
class MemoryStats:
    entries: int  # segments (cached prefixes)
    pages: int
    tokens: int
    bytes: int  # allocated by the kept stores
    max_bytes: int


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Segment:
    __slots__ = ("ends", "keys", "last_used", "store")

    def __init__(self, store: CachedStore, keys: list[str], ends: list[int]) -> None:
        self.store, self.keys, self.ends, self.last_used = store, keys, ends, time.monotonic()

    @property
    def tokens(self) -> int:
        return self.ends[-1] if self.ends else 0


class MemoryCache:
    """Stores of recently prefilled prompts, each with the keys of the pages it holds.

    A prompt matching a whole segment borrows its store (its question and answer are appended, then
    the store is truncated back to its pages); one matching only a prefix truncates the segment to the
    shared pages when less would be lost than kept, else copies them into a new store (copy-on-write),
    so two corpora behind a shared preamble stay cached together. Least recently used segments are
    evicted beyond ``max_bytes``.
    """

    def __init__(self, max_bytes: int, new_store: Callable[[int], CachedStore] = ResidentStore) -> None:
        self.new_store = new_store  # num_layers -> an empty store (host memory under offload)
        self.max_bytes = max_bytes
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self.epoch = 0  # bumped by `clear`; a run that started before a clear does not re-insert

    def acquire(
        self, keys: Sequence[str], ends: Sequence[int], num_layers: int, reserve: int
    ) -> tuple[CachedStore, int]:
        """A store holding the longest cached prefix of ``keys`` and that prefix's length in pages.

        ``ends[i]``: the token offset where page ``i`` ends. The store is the caller's until `release`.
        """
        with self._lock:
            best, n = None, 0
            for seg in self._segments:
                m = _common_prefix(seg.keys, keys)
                if m > n:
                    best, n = seg, m
            if best is None:
                store = self.new_store(num_layers)
                store.reserve(reserve)
                return store, 0
            best.last_used = time.monotonic()
            tokens = ends[n - 1]
            if len(best.keys) - n <= n:  # borrow; truncate back (drops at most as much as it keeps)
                self._segments.remove(best)
                best.store.truncate(tokens)
                if best.store.capacity() < reserve:
                    best.store.reserve(reserve)
                return best.store, n
            store = self.new_store(num_layers)  # copy-on-write: the segment keeps its other pages
            store.reserve(reserve)
            store.share_prefix(best.store, tokens)  # adopted cache pages are shared, the rest copied
            return store, n

    def release(self, store: CachedStore, keys: list[str], ends: list[int], epoch: int) -> None:
        """Keep ``store`` (truncated to ``keys``' pages, which end at ``ends``) as a segment; evict beyond the cap."""
        store.truncate(ends[-1] if keys else 0)
        with self._lock:
            if epoch != self.epoch or not keys:
                return
            self._segments = [s for s in self._segments if s.keys != keys]
            self._segments.append(_Segment(store, keys, ends))
            total = sum(s.store.nbytes() for s in self._segments)
            while self._segments and total > self.max_bytes:
                lru = min(self._segments, key=lambda s: s.last_used)
                self._segments.remove(lru)
                total -= lru.store.nbytes()
                log.info(
                    "prefix cache: dropped a %d-token prefix from memory (cap %d bytes)", lru.tokens, self.max_bytes
                )

    def stats(self) -> MemoryStats:
        with self._lock:
            pages = sum(len(s.keys) for s in self._segments)
            return MemoryStats(
                entries=len(self._segments),
                pages=pages,
                tokens=sum(s.tokens for s in self._segments),
                bytes=sum(s.store.nbytes() for s in self._segments),
                max_bytes=self.max_bytes,
            )

    def clear(self) -> None:
        with self._lock:
            self._segments = []
            self.epoch += 1
