"""The prefix cache: prefill a corpus once, reuse its keys and values for every later prompt.

Pages of ``page_size`` tokens, named by a hash chain over token ids (`reattention_core.cache.chain`),
are found in memory (`MemoryCache`), then on disk (`DiskCache`); prefill resumes after the last one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from reattention_core.cache.chain import cacheable_pages, chain_ends, page_keys
from reattention_core.cache.config import CacheConfig, default_memory_bytes
from reattention_core.cache.disk import DiskCache, DiskStats
from reattention_core.cache.fingerprint import (
    EngineFingerprint,
    engine_fingerprint,
    kernels_fingerprint,
    model_fingerprint,
    resolved_backend,
    tokenizer_fingerprint,
)
from reattention_core.cache.memory import MemoryCache, MemoryStats
from reattention_core.config import RunSettings
from reattention_core.hf.architectures import kv_shape, model_config
from reattention_core.hf.compiled import FINGERPRINT as COMPILED_FINGERPRINT
from reattention_core.store import CachedStore, OffloadConfig, ResidentStore

log = logging.getLogger("reattention")

# Spare capacity reserved beyond a cached prefix, so a question and its answer fit without a copy.
_SLACK_PAGES = 2


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


@dataclass(frozen=True)
class PageSource:
    """What computed the keys and values a prefix cache holds: a model and its tokenizer.

    Attributes:
        model: the model (its weights are fingerprinted by samples, `model_fingerprint`).
        tokenizer: its tokenizer.
        model_name: a display name for the disk cache's manifest.
    """

    model: torch.nn.Module
    tokenizer: Any
    model_name: str = ""


class PrefixCache:
    """An engine's prefix cache: memory segments, the optional disk store and the fingerprints.

    Corpus boundary: a ``context=`` prompt's chain stops with a tail page where its corpus ends, and
    prefill breaks its chunk schedule there (`plan_prefill`), so the corpus's keys and values never
    depend on the question. Exactness: keys and values depend on the chunk schedule and the last
    prompt token runs alone, so only pages ending at or before ``N - 1`` are cached; a warm run then
    reproduces the cold run bit for bit.

    Args:
        config: the cache's settings.
        source: the model whose keys and values it holds.
        device: where its stores live (their memory sizes the default cap).
        new_store: ``num_layers -> an empty store``.
        selection: a fingerprint component for an approximate selection (``None``: exact).
    """

    def __init__(
        self,
        config: CacheConfig,
        source: PageSource,
        device: torch.device,
        new_store: Callable[[int], CachedStore] = ResidentStore,
        selection: str | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.memory = MemoryCache(config.memory_bytes or default_memory_bytes(device), new_store)
        self.selection = selection
        self.disk = DiskCache(config.resolved_dir(), config.resolved_disk_bytes()) if config.disk else None
        self._hashes: dict[tuple, str] = {}

    @classmethod
    def for_engine(
        cls,
        config: CacheConfig,
        source: PageSource,
        new_store: Callable[[int], CachedStore],
        offload: OffloadConfig | None = None,
    ) -> PrefixCache | None:
        """An engine's prefix cache (``None`` when ``config`` turns it off), its stores made by
        ``new_store``: on the model's device, or in host memory under ``offload``."""
        if not config.enabled:
            return None
        device = next(source.model.parameters()).device
        if offload is None:
            return cls(config, source, device, new_store)
        # a budgeted (approximate) selection caches under its own fingerprint
        selection = None if offload.exact else f"offload(block={offload.block},budget={offload.budget})"
        if offload.keys == "device" and config.memory_bytes is None:
            # half of each kept store is keys on the device: cap the total so that neither the
            # device's nor the host's share passes a third of that memory (the resident default)
            both = min(default_memory_bytes(device), default_memory_bytes(torch.device("cpu")))
            config = dataclasses.replace(config, memory_bytes=2 * both)
        return cls(config, source, torch.device("cpu"), new_store, selection)

    def fingerprint(self, settings: RunSettings) -> EngineFingerprint:
        """The fingerprint of the source model under ``settings`` (model and tokenizer hashed once)."""
        config, kernel_options = settings.config, settings.kernel_options
        model, tokenizer = self.source.model, self.source.tokenizer
        param = next(model.parameters())
        mkey = ("model", id(model), param.dtype, param.device)
        if mkey not in self._hashes:
            self._hashes[mkey] = model_fingerprint(model)
        tkey = ("tokenizer", id(tokenizer))
        if tkey not in self._hashes:
            self._hashes[tkey] = tokenizer_fingerprint(tokenizer)
        backend = resolved_backend(param.device, kernel_options.backend)
        fp = engine_fingerprint(
            model_hash=self._hashes[mkey],
            tokenizer_hash=self._hashes[tkey],
            config=config,
            dtype=param.dtype,
            device=param.device,
            backend=backend,
            page_size=self.config.page_size_for(config),
            model_name=self.source.model_name,
            selection=self.selection,
            compiled=COMPILED_FINGERPRINT if settings.compile_model else None,
        )
        kernels = kernels_fingerprint(kernel_options, backend)
        return fp if kernels is None else fp.with_component("kernels", kernels)

    def begin(
        self,
        ids: Sequence[int],
        settings: RunSettings,
        *,
        reserve: int,
        num_pages: int | None = None,
        boundary: int | None = None,
    ) -> PrefixRun:
        """Start a run over ``ids``: restore its longest cached prefix into a store with room for ``reserve``.

        ``num_pages``: pages of ``ids`` to cache (default: those ending before the last token).
        ``boundary``: the corpus ends there (``context=`` prompts): cache the pages before it and
        its tail page instead; prefill must break its chunk schedule at ``boundary``.
        A page file whose tensors have another shape than the model's keys is a bad page.
        """
        model = self.source.model
        param = next(model.parameters())
        fp, page_size = self.fingerprint(settings), self.config.page_size_for(settings.config)
        config = model_config(model)
        layers, shape = config.num_hidden_layers, kv_shape(config)
        run = PrefixRun(self, ids, fp, page_size, layers, param.device, param.dtype, num_pages, boundary, shape)
        try:
            run.restore(reserve)
        except BaseException:  # Ctrl-C while pages load: keep the complete ones, nothing half-done
            run.finish()
            raise
        return run

    def info(self, settings: RunSettings) -> CacheInfo:
        """Entries, pages, tokens and bytes in memory, and on disk under ``settings``' fingerprint."""
        page_size = self.config.page_size_for(settings.config)
        fp = self.fingerprint(settings)
        disk = self.disk.stats(fp, page_size) if self.disk is not None else None
        return CacheInfo(page_size=page_size, memory=self.memory.stats(), disk=disk)

    def clear(self, settings: RunSettings, *, disk: bool = True, all_fingerprints: bool = False) -> None:
        """Forget every prefix in memory, and on disk ``settings``' pages (or every fingerprint's)."""
        self.memory.clear()
        if disk and self.disk is not None:
            self.disk.clear(None if all_fingerprints else self.fingerprint(settings))


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
            pages = disk.load(
                self.fp, refs, num_layers=self.num_layers, dtype=self.dtype, pin=pin, kv_shape=self.kv_shape
            )
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
                self.cached_tokens,
                self.from_memory,
                self.from_disk,
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
                disk.max_bytes,
                a,
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
