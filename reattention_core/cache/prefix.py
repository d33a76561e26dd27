"""Prefix cache: prefill a corpus once, reuse its keys and values for every later prompt.

The unit is a **page** of ``page_size`` tokens (a multiple of the config's ``prefill_chunk_size``;
by default the smallest multiple that is at least 1024 tokens: 1024 for the embedded model). Page
``i`` of a prompt is identified by a hash chain over token ids::

    key[-1] = fingerprint root                     (model, tokenizer, config, dtype, ... see fingerprint.py)
    key[i]  = sha256(key[i-1] || token ids of page i as little-endian int64)

so a page's key names its whole prefix and everything that shaped its keys and values. Any later
prompt that starts with the same tokens finds the same keys, in memory (`MemoryCache`) and then on
disk (`reattention_core.cache.disk.DiskCache`), and prefill resumes after the last page found.

**Corpus boundary.** A prompt built with ``context=`` also knows where its corpus ends (``b``,
the tokens rendered before the question). Its chain then stops at ``b``: the whole pages before
``b`` and one shorter **tail page** ``[floor(b / page_size) * page_size, b)``, keyed
``sha256(key[i-1] || "tail" || token ids)`` (never equal to a whole page's key). Prefill breaks
its chunk schedule at ``b`` (see `reattention_core.generation.prefill.plan_prefill`), so the corpus's keys
and values never depend on the question, and a later question over the same corpus prefills only
its own tokens.

**Exactness.** Under ReAttention a token's keys and values depend on the prefill chunk schedule (one
selection per chunk), and the last prompt token always runs alone (`reattention_core.generation.prefill`).
Only pages that end at or before ``N - 1`` (``N`` the prompt length) are cached, so every cached
token was computed inside a regular chunk, exactly as in any longer prompt; a warm run resuming at
a page boundary therefore reproduces the cold run bit for bit (greedy output is identical).

**Memory.** The engine keeps the stores of recent prompts as *segments* (a `KVStore` and the keys of
the pages it holds). A prompt whose pages match a whole segment borrows that store: its question
and answer are appended, then the store is truncated back to its pages (the corpus is never
modified). A prompt that matches only a prefix of a segment truncates the segment back to the
shared pages when less would be lost than kept, and otherwise copies the shared pages into a new
store (copy-on-write), so two corpora behind a shared preamble stay cached together. Segments are
evicted least recently used beyond ``memory_bytes``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reattention_core.config import ReAttentionConfig
from reattention_core.cache.directory import default_cache_dir, default_max_bytes, parse_bytes
from reattention_core.cache.disk import DiskCache, DiskStats
from reattention_core.errors import ConfigError
from reattention_core.cache.fingerprint import (
    EngineFingerprint,
    engine_fingerprint,
    model_fingerprint,
    resolved_backend,
    tokenizer_fingerprint,
)
from reattention_core.store.resident import KVStore

log = logging.getLogger("reattention")

# Pages are at least this many tokens by default (rounded up to a multiple of the prefill chunk).
DEFAULT_PAGE_TOKENS = 1024
# Spare capacity reserved beyond a cached prefix, so a question and its answer fit without a copy.
_SLACK_PAGES = 2
# Domain tag of tail pages (shorter than a page, ending at a corpus boundary) in the hash chain.
_TAIL_TAG = b"reattention-tail-page"


def default_page_size(prefill_chunk_size: int) -> int:
    """The smallest multiple of ``prefill_chunk_size`` that is at least 1024 tokens."""
    return prefill_chunk_size * max(1, -(-DEFAULT_PAGE_TOKENS // prefill_chunk_size))


def default_memory_bytes(device: torch.device) -> int:
    """A third of the GPU's memory for CUDA, a third of physical RAM otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 3
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 3
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Settings of the engine's prefix cache.

    Args:
        enabled: keep and reuse prefilled pages at all (``False``: every prompt is prefilled cold).
        page_size: tokens per page, a multiple of ``prefill_chunk_size`` (default: the smallest
            multiple >= 1024). Smaller pages reuse more of a prompt that diverges mid-page (the
            tokens after the last full page before the final token are always recomputed: on
            average half a page) but make more files.
        memory_bytes: cap on the stores kept in memory (default: a third of RAM, or of GPU memory).
        disk: also keep pages on disk, across processes and restarts.
        dir: the disk cache directory (default: ``$REATTENTION_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/reattention``, else ``~/.cache/reattention``).
        disk_bytes: cap on the disk cache, LRU-evicted (default: ``$REATTENTION_CACHE_MAX_BYTES``,
            else 32 GiB); an int or a string like ``"64G"``.
    """

    enabled: bool = True
    page_size: int | None = None
    memory_bytes: int | None = None
    disk: bool = True
    dir: str | Path | None = None
    disk_bytes: int | str | None = None

    def __post_init__(self) -> None:
        for name in ("enabled", "disk"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"CacheConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.dir is not None and not isinstance(self.dir, (str, os.PathLike)):
            raise ConfigError(f"CacheConfig.dir must be a folder path or None, got {self.dir!r}")
        for name in ("page_size", "memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"CacheConfig.{name} must be a positive int or None, got {value!r}")
        if self.disk_bytes is not None:
            try:
                ok = parse_bytes(self.disk_bytes) >= 0 and not isinstance(self.disk_bytes, bool)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"CacheConfig.disk_bytes must be a byte count like 34359738368 or '32G', got {self.disk_bytes!r}")

    def page_size_for(self, config: ReAttentionConfig) -> int:
        """The page size under ``config``; `ConfigError` if it is not a multiple of the prefill chunk."""
        chunk = config.prefill_chunk_size
        if self.page_size is None:
            return default_page_size(chunk)
        if self.page_size % chunk:
            raise ConfigError(
                f"CacheConfig.page_size ({self.page_size}) must be a multiple of prefill_chunk_size ({chunk}): "
                "a cached page must end on a prefill chunk boundary to be reused exactly. "
                f"Use page_size={default_page_size(chunk)} or leave it None."
            )
        return self.page_size

    def resolved_dir(self) -> Path:
        return Path(self.dir).expanduser() if self.dir is not None else default_cache_dir()

    def resolved_disk_bytes(self) -> int:
        return parse_bytes(self.disk_bytes) if self.disk_bytes is not None else default_max_bytes()


@dataclass(frozen=True)
class MemoryStats:
    entries: int  # segments (cached prefixes)
    pages: int
    tokens: int
    bytes: int  # allocated by the kept stores
    max_bytes: int


@dataclass(frozen=True)
class CacheInfo:
    """What `ReAttentionEngine.cache_info` returns.

    Attributes:
        page_size: tokens per page under the engine's current config.
        memory: entries (cached prefixes), pages, tokens and bytes held in memory.
        disk: the same for this engine's fingerprint on disk (``None`` with the disk cache off),
            plus ``total_bytes`` of the whole directory and the cap.
    """

    page_size: int
    memory: MemoryStats
    disk: DiskStats | None

    @property
    def entries(self) -> int:
        return max(self.memory.entries, self.disk.entries if self.disk else 0)

    @property
    def tokens(self) -> int:
        return max(self.memory.tokens, self.disk.tokens if self.disk else 0)

    @property
    def bytes(self) -> int:
        return self.memory.bytes + (self.disk.bytes if self.disk else 0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cacheable_pages(num_tokens: int, page_size: int) -> int:
    """Pages of a prompt that end at or before its last token (which always runs alone)."""
    return max(0, (num_tokens - 1) // page_size)


def page_keys(
    root: str, ids: Sequence[int], page_size: int, num_pages: int, *, tail_end: int | None = None
) -> list[str]:
    """Hash-chain keys of the first ``num_pages`` pages of ``ids`` (see the module doc).

    ``tail_end``: also the key of the tail page ``[num_pages * page_size, tail_end)`` (a corpus
    boundary inside the next page); nothing is added when that range is empty.
    """
    arr = np.asarray(ids[: max(num_pages * page_size, tail_end or 0)], dtype="<i8")
    prev = bytes.fromhex(root)
    keys = []
    for i in range(num_pages):
        prev = hashlib.sha256(prev + arr[i * page_size : (i + 1) * page_size].tobytes()).digest()
        keys.append(prev.hex())
    if tail_end is not None and tail_end > num_pages * page_size:
        if tail_end >= (num_pages + 1) * page_size:
            raise ValueError(f"tail_end={tail_end} is not inside page {num_pages} of {page_size} tokens")
        keys.append(hashlib.sha256(prev + _TAIL_TAG + arr[num_pages * page_size : tail_end].tobytes()).hexdigest())
    return keys


def chain_ends(num_keys: int, page_size: int, tail_end: int | None = None) -> list[int]:
    """End offset (in tokens) of each page of a chain of ``num_keys`` keys from `page_keys`."""
    ends = [(i + 1) * page_size for i in range(num_keys)]
    if ends and tail_end is not None and tail_end < ends[-1]:
        ends[-1] = tail_end
    return ends


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Segment:
    __slots__ = ("ends", "keys", "last_used", "store")

    def __init__(self, store: KVStore, keys: list[str], ends: list[int]) -> None:
        self.store, self.keys, self.ends, self.last_used = store, keys, ends, time.monotonic()

    @property
    def tokens(self) -> int:
        return self.ends[-1] if self.ends else 0


class MemoryCache:
    """Stores of recently prefilled prompts, each with the keys of the pages it holds."""

    def __init__(self, max_bytes: int, new_store: Callable[[int], KVStore] = KVStore) -> None:
        self.new_store = new_store  # num_layers -> an empty store (host memory under offload)
        self.max_bytes = max_bytes
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self.epoch = 0  # bumped by `clear`; a run that started before a clear does not re-insert

    def acquire(
        self, keys: Sequence[str], ends: Sequence[int], num_layers: int, reserve: int
    ) -> tuple[KVStore, int]:
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

    def release(self, store: KVStore, keys: list[str], ends: list[int], epoch: int) -> None:
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
                log.info("prefix cache: dropped a %d-token prefix from memory (cap %d bytes)",
                         lru.tokens, self.max_bytes)

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


class PrefixCache:
    """An engine's prefix cache: memory segments, the optional disk store and the fingerprints."""

    def __init__(
        self,
        config: CacheConfig,
        device: torch.device,
        new_store: Callable[[int], KVStore] = KVStore,
        selection: str | None = None,
    ) -> None:
        """``new_store``: ``num_layers -> empty store``; ``device``: where those stores live (their
        memory sizes the default cap); ``selection``: a fingerprint component for approximate
        selection (``None``: exact)."""
        self.config = config
        self.memory = MemoryCache(config.memory_bytes or default_memory_bytes(device), new_store)
        self.selection = selection
        self.disk = DiskCache(config.resolved_dir(), config.resolved_disk_bytes()) if config.disk else None
        self._hashes: dict[tuple, str] = {}

    def fingerprint(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: ReAttentionConfig,
        backend: str | None,
        model_name: str,
        compiled: str | None = None,
    ) -> EngineFingerprint:
        param = next(model.parameters())
        mkey = ("model", id(model), param.dtype, param.device)
        if mkey not in self._hashes:
            self._hashes[mkey] = model_fingerprint(model)
        tkey = ("tokenizer", id(tokenizer))
        if tkey not in self._hashes:
            self._hashes[tkey] = tokenizer_fingerprint(tokenizer)
        return engine_fingerprint(
            model_hash=self._hashes[mkey],
            tokenizer_hash=self._hashes[tkey],
            config=config,
            dtype=param.dtype,
            device=param.device,
            backend=resolved_backend(param.device, backend),
            page_size=self.config.page_size_for(config),
            model_name=model_name,
            selection=self.selection,
            compiled=compiled,
        )

    def begin(
        self,
        ids: Sequence[int],
        fp: EngineFingerprint,
        *,
        page_size: int,
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        reserve: int,
        num_pages: int | None = None,
        boundary: int | None = None,
        kv_shape: tuple[int, int] | None = None,
    ) -> PrefixRun:
        """Start a run over ``ids``: restore its longest cached prefix into a store.

        ``num_pages``: pages of ``ids`` to cache (default: those ending before the last token).
        ``boundary``: the corpus ends there (``context=`` prompts): cache the pages before it and
        its tail page instead; prefill must break its chunk schedule at ``boundary``.
        ``kv_shape``: ``(KV heads, head dim)`` of the model; a page file of another shape is a bad page.
        """
        run = PrefixRun(self, ids, fp, page_size, num_layers, device, dtype, num_pages, boundary, kv_shape)
        try:
            run.restore(reserve)
        except BaseException:  # Ctrl-C while pages load: keep the complete ones, nothing half-done
            run.finish()
            raise
        return run

    def info(self, fp: EngineFingerprint, page_size: int) -> CacheInfo:
        disk = self.disk.stats(fp, page_size) if self.disk is not None else None
        return CacheInfo(page_size=page_size, memory=self.memory.stats(), disk=disk)

    def clear(self, fp: EngineFingerprint | None, *, disk: bool = True, all_fingerprints: bool = False) -> None:
        self.memory.clear()
        if disk and self.disk is not None:
            self.disk.clear(None if all_fingerprints else fp)


class PrefixRun:
    """One prompt's use of the cache: restore, save pages as prefill completes them, give back.

    Attributes:
        store: the store to prefill into; it holds ``cached_tokens`` tokens after `restore`.
        cached_tokens: prompt tokens restored (``from_memory + from_disk``).
    """

    def __init__(
        self,
        cache: PrefixCache,
        ids: Sequence[int],
        fp: EngineFingerprint,
        page_size: int,
        num_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        num_pages: int | None,
        boundary: int | None = None,
        kv_shape: tuple[int, int] | None = None,
    ) -> None:
        self.cache, self.fp, self.page_size = cache, fp, page_size
        self.num_layers, self.device, self.dtype, self.kv_shape = num_layers, device, dtype, kv_shape
        if boundary is not None:
            if not 0 < boundary <= len(ids):
                raise ValueError(f"boundary={boundary} is outside the {len(ids)}-token prompt")
            self.keys = page_keys(fp.root, ids, page_size, boundary // page_size, tail_end=boundary)
        else:
            n = cacheable_pages(len(ids), page_size) if num_pages is None else num_pages
            self.keys = page_keys(fp.root, ids, page_size, n)
        self.ends = chain_ends(len(self.keys), page_size, boundary)
        self.pinned = set(self.keys)
        self.store = cache.memory.new_store(num_layers)
        self.cached_tokens = self.from_memory = self.from_disk = 0
        self._valid = 0  # tokens known complete in every layer of the store
        self._saved = 0  # pages known to be on disk (or not to be written)
        self._epoch = cache.memory.epoch
        self._disk_ok = cache.disk is not None
        self._wrote = False
        self._done = False

    def restore(self, reserve: int) -> None:
        ps = self.page_size
        slack = reserve + _SLACK_PAGES * ps if self.keys else reserve
        self.store, n_mem = self.cache.memory.acquire(self.keys, self.ends, self.num_layers, slack)
        self._valid = self.ends[n_mem - 1] if n_mem else 0
        self.from_memory = self._valid
        self._saved = n_mem
        disk = self.cache.disk
        if disk is not None and n_mem < len(self.keys):
            refs = disk.refs(self.fp, self.keys, self.ends, n_mem)
            # a store that maps pages keeps the loader's mapped views (no pinned copies to make)
            pin = self.device.type == "cuda" and not self.store.maps_pages
            pages = disk.load(self.fp, refs, num_layers=self.num_layers, dtype=self.dtype, pin=pin,
                              kv_shape=self.kv_shape)
            for keys, values in pages:
                for layer in range(self.num_layers):
                    k, v = keys[layer].unsqueeze(0), values[layer].unsqueeze(0)
                    self.store.adopt(layer, k, v, device=self.device, dtype=self.dtype)
                self.from_disk += self.ends[self._saved] - self._valid
                self._valid = self.ends[self._saved]
                self._saved += 1
        self.store.truncate(self._valid)
        self.cached_tokens = self._valid
        if self.cached_tokens:
            log.info(
                "prefix cache: restored %d tokens (%d from memory, %d from disk)",
                self.cached_tokens, self.from_memory, self.from_disk,
            )

    def on_chunk(self, end: int) -> None:
        """Prefill appended tokens up to ``end``: write the pages that are now complete."""
        self._valid = end
        while self._saved < len(self.keys) and self.ends[self._saved] <= end:
            self._save_page(self._saved)
            self._saved += 1

    def _save_page(self, index: int) -> None:
        disk = self.cache.disk
        if disk is None or not self._disk_ok:
            return
        ref = disk.refs(self.fp, self.keys[: index + 1], self.ends, index)[0]
        a, b = index * self.page_size, self.ends[index]
        ks, vs = [], []
        for layer in range(self.num_layers):
            k, v = self.store.view(layer)
            ks.append(k[0, a:b])
            vs.append(v[0, a:b])
        result = disk.save(self.fp, ref, ks, vs, pinned=self.pinned)
        if result == "written":
            self._wrote = True
        elif result == "cap":
            log.warning(
                "prefix cache: this prompt alone outgrows the disk cache cap (%d bytes); its pages after token %d "
                "are kept in memory only. Raise CacheConfig(disk_bytes=...) or REATTENTION_CACHE_MAX_BYTES",
                disk.max_bytes, a,
            )
            self._disk_ok = False
        elif result == "error":
            self._disk_ok = False

    def finish(self) -> None:
        """Give the store back to the memory cache (truncated to its complete pages); touch disk pages."""
        if self._done:
            return
        self._done = True
        pages = sum(1 for end in self.ends if end <= self._valid)
        self.cache.memory.release(self.store, self.keys[:pages], self.ends[:pages], self._epoch)
        disk = self.cache.disk
        if disk is not None and pages:
            disk.touch(disk.refs(self.fp, self.keys[:pages], self.ends))
            if self._wrote:  # other processes may have written too: check the cap once per run
                try:
                    disk.evict(self.pinned)
                except OSError as exc:  # the answer is computed: a folder gone bad must not lose it
                    log.warning("prefix cache: could not check the disk cache's size cap in %s: %s", disk.dir, exc)
