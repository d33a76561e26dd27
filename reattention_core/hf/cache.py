"""`ReAttentionCache`: a `transformers.Cache` whose layers write into a `KVStore`, and the step context
every attention layer of a forward pass reads from it.

Under `enable_reattention` keys reach ``update`` without RoPE; the registered attention function
reads the store, a CUDA-graph step's shift and an observer from `ReAttentionCache.step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from reattention_core.attention.step import SelectionObserver
from reattention_core.hf import _compat
from reattention_core.store.protocol import KVStore

_Cache: Any
_CacheLayerMixin: Any
_Cache, _CacheLayerMixin = _compat.cache_classes()


@dataclass(frozen=True)
class StepContext:
    """What the attention layers of a forward pass work on.

    Attributes:
        store: where the keys and values live.
        shift: inside a CUDA-graph step, an int64 ``[1]`` device tensor of the tokens stored since the
            step was recorded (`reattention_core.generation.cuda_graph`); ``None`` otherwise.
        observer: called with every layer step's selection (``None``: not observed).
    """

    store: KVStore
    shift: torch.Tensor | None = None
    observer: SelectionObserver | None = None


class ReAttentionLayer(_CacheLayerMixin):
    """One layer's view of its cache's `KVStore`."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, cache: ReAttentionCache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = self.cache.step
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        keys, values = step.store.append(self.layer_idx, k, v, shift=step.shift)
        self.keys, self.values = keys.transpose(1, 2), values.transpose(1, 2)
        return self.keys, self.values

    def get_seq_length(self, *args: object) -> int:
        return self.cache.store.length(self.layer_idx)

    def get_mask_sizes(self, *args: object) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache.store.truncate(0)

    def crop(self, max_length: int) -> None:
        self.cache.store.truncate(max_length)


def keep_out_of_graphs() -> None:
    """Make compiled decoder layers (`hf.compiled`) run the store write as it is, between graphs.

    Called on first use of compiled layers, not at import: ``torch.compiler.disable`` imports
    ``torch._dynamo``, which imports triton (too early for ``TRITON_INTERPRET``, and slow).
    """
    if not getattr(ReAttentionLayer.update, "_reattention_disabled", False):
        update = torch.compiler.disable(ReAttentionLayer.update)
        update._reattention_disabled = True
        ReAttentionLayer.update = update  # type: ignore[method-assign]


class ReAttentionCache(_Cache):
    """A Hugging Face cache backed by a `KVStore` of pre-RoPE keys and values.

    Args:
        store (KVStore): where the tokens live; it outlives the cache and can be reused.
        observer: called with every selecting layer step's `SelectionEvent` (diagnostics).
    """

    def __init__(self, store: KVStore, *, observer: SelectionObserver | None = None) -> None:
        _compat.cache_base_init(self, [ReAttentionLayer(self, i) for i in range(store.num_layers)])
        self.step = StepContext(store, observer=observer)

    @property
    def store(self) -> KVStore:
        return self.step.store

    @contextmanager
    def shifted(self, shift: torch.Tensor) -> Iterator[StepContext]:
        """Run the forward passes inside as shifted CUDA-graph steps (`reattention_core.generation.cuda_graph`)."""
        outer = self.step
        self.step = dataclasses.replace(outer, shift=shift)
        try:
            yield self.step
        finally:
            self.step = outer

    def get_seq_length(self, layer_idx: int = 0, *args: object) -> int:
        return self.store.length(layer_idx)
