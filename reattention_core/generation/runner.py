"""`Runner`: how an engine runs one generation at a time.

A session holds the engine's lock, runs the model under ReAttention (and compiled layers, with
``compile_model``), restores the prompt's longest cached prefix into a store (or takes a fresh one)
and gives the `ReAttentionCache` over it; its `Session.steps` are the forward passes, through CUDA
graphs where they apply (`GraphPolicy`). The loop that drives them is `generation.loop`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from reattention_core.attention import SelectionObserver
from reattention_core.cache import PrefixCache, PrefixRun
from reattention_core.config import RunSettings
from reattention_core.generation.cuda_graph import GraphPolicy
from reattention_core.generation.loop import ModelSteps
from reattention_core.hf import ReAttentionCache, enable_reattention
from reattention_core.hf.architectures import model_config
from reattention_core.hf.compiled import compiled_layers
from reattention_core.store import CachedStore, OffloadConfig
from reattention_core.store.offloaded import make_store


@dataclass(frozen=True)
class Session:
    """One generation's cache (over its store) and prefix-cache run (``None`` without the cache)."""

    model: torch.nn.Module
    cache: ReAttentionCache
    run: PrefixRun | None
    graphs: GraphPolicy

    @property
    def cached_tokens(self) -> int:
        return self.run.cached_tokens if self.run is not None else 0

    def steps(self, prefill_tokens: int, max_length: int, decode_steps: int) -> ModelSteps:
        """The forward passes over the cache: a prefill of ``prefill_tokens`` and ``decode_steps``
        decode steps, the store holding at most ``max_length`` tokens."""
        return ModelSteps(
            self.model, self.cache, self.graphs.config.prefill_chunk_size,
            prefill_graph=self.graphs.prefill(self.cache, prefill_tokens, max_length),
            decode_graph=self.graphs.decode(self.cache, max_length, decode_steps),
        )  # fmt: skip


class Runner:
    """Runs an engine's generations one at a time (see the module doc).

    Args:
        model: the engine's model.
        prefix: its prefix cache (``None``: off).
        offload: where its stores keep their tokens (``None``: resident on the model's device).
    """

    def __init__(
        self, model: torch.nn.Module, prefix: PrefixCache | None, offload: OffloadConfig | None = None
    ) -> None:
        self.model, self.prefix, self.offload = model, prefix, offload
        self.lock = threading.RLock()

    @contextmanager
    def session(
        self,
        ids: list[int],
        settings: RunSettings,
        *,
        reserve: int,
        boundary: int | None = None,
        num_pages: int | None = None,
        cached: bool = True,
        observer: SelectionObserver | None = None,
    ) -> Iterator[Session]:
        """A session over a store with room for ``reserve`` tokens, holding the longest cached prefix of
        ``ids`` (`PrefixCache.begin`: ``boundary``, ``num_pages``); without ``cached``, a fresh store.
        An ``observer`` turns CUDA graphs off (it reads each step's selection on the host)."""
        with self.lock, self.running(settings):
            run = None
            if cached and self.prefix is not None:
                run = self.prefix.begin(ids, settings, reserve=reserve, num_pages=num_pages, boundary=boundary)
            try:
                store = run.store if run is not None else self.fresh_store(reserve)
                on = settings.cuda_graphs and observer is None
                graphs = GraphPolicy(self.model, settings.config, settings.kernel_options, enabled=on)
                yield Session(self.model, ReAttentionCache(store, observer=observer), run, graphs)
            finally:
                if run is not None:
                    run.finish()  # truncates the store back to its pages: the cached corpus is unchanged

    @contextmanager
    def running(self, settings: RunSettings) -> Iterator[None]:
        """The model under ReAttention with ``settings`` (and compiled layers, with ``compile_model``)."""
        with enable_reattention(self.model, settings.config, kernel_options=settings.kernel_options):
            with compiled_layers(self.model, settings.compile_model):
                yield

    def new_store(self, num_layers: int) -> CachedStore:
        return make_store(num_layers, self.offload, next(self.model.parameters()).device)

    def fresh_store(self, reserve: int) -> CachedStore:
        """An empty store for every layer of the model, with room for ``reserve`` tokens."""
        store = self.new_store(model_config(self.model).num_hidden_layers)
        store.reserve(reserve)
        return store
