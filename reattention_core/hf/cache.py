"""`ReAttentionCache`: a `transformers.Cache` whose layers write into a `KVStore`.

Under `enable_reattention`, the keys that reach ``update`` carry no RoPE, so the store holds
pre-RoPE keys. ``update`` returns ``[B, H, T, D]`` views of everything stored for the layer (no
copy), which the registered ReAttention attention function consumes.
"""

from __future__ import annotations

import torch

from reattention_core.generation import cuda_graph
from reattention_core.store import offloaded as offload
from reattention_core.hf import _compat
from reattention_core.store.resident import KVStore

_Cache, _CacheLayerMixin = _compat.cache_classes()


class ReAttentionLayer(_CacheLayerMixin):
    """One layer's view of the shared `KVStore`."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, store: KVStore, layer_idx: int) -> None:
        super().__init__()
        self.store = store
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        step = cuda_graph.current()
        if step is not None:  # a recorded (or emulated) graph step: write at a device index
            keys, values = self.store.append_shifted(self.layer_idx, k, v, step.shift)
            step.total = self.store.length(self.layer_idx)
        else:
            keys, values = self.store.append(self.layer_idx, k, v)
        if isinstance(self.store, offload.OffloadedStore):  # host tensors: the attention call reads the store
            offload.hand_over(self.store, self.layer_idx)
            if not isinstance(keys, torch.Tensor):  # adopted cache pages (`TokenSegments`): never joined
                keys, values = k, v
        self.keys, self.values = keys.transpose(1, 2), values.transpose(1, 2)
        return self.keys, self.values

    def get_seq_length(self, *args: object) -> int:
        return self.store.length(self.layer_idx)

    def get_mask_sizes(self, *args: object) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store.truncate(0)

    def crop(self, max_length: int) -> None:
        self.store.truncate(max_length)


def keep_out_of_graphs() -> None:
    """Make compiled decoder layers (`hf.compiled`) run the store write as it is, between graphs.

    Called on first use of compiled layers, not at import: ``torch.compiler.disable`` imports
    ``torch._dynamo``, which imports triton (too early for ``TRITON_INTERPRET``, and slow).
    """
    if not getattr(ReAttentionLayer.update, "_reattention_disabled", False):
        update = torch.compiler.disable(ReAttentionLayer.update)
        update._reattention_disabled = True  # type: ignore[attr-defined]
        ReAttentionLayer.update = update  # type: ignore[method-assign]


class ReAttentionCache(_Cache):
    """A Hugging Face cache backed by a `KVStore` of pre-RoPE keys and values.

    Args:
        store (KVStore): where the tokens live; it outlives the cache and can be reused.
    """

    def __init__(self, store: KVStore) -> None:
        _compat.cache_base_init(self, [ReAttentionLayer(store, i) for i in range(store.num_layers)])
        self.store = store

    def get_seq_length(self, layer_idx: int = 0, *args: object) -> int:
        return self.store.length(layer_idx)
