"""`KVStore`: what the model's cache, the attention layer and the prefix cache need from a store.

A store keeps every layer's pre-RoPE keys and values ``[B, T, H, D]``. The attention layer reads a
layer through `KVStore.layer`, a `reattention_core.attention.LayerKV` that scores the middle and
attends over the scope where the tokens live; central code asks a store what it can do
(`graph_steps`, ``maps_pages``) instead of checking its class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from reattention_core.attention import LayerKV
    from reattention_core.store.segments import TokenSegments


class KVStore(Protocol):
    """Every layer's pre-RoPE keys and values (resident, offloaded or sharded)."""

    num_layers: int

    def length(self, layer: int = 0) -> int:
        """Tokens stored for ``layer`` (in the whole sequence, for a sharded store)."""
        ...

    def min_length(self) -> int:
        """Tokens held by every layer (layers differ only while a forward pass is under way)."""
        ...

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens per layer, so that appends up to that length never copy."""
        ...

    def truncate(self, tokens: int) -> None:
        """Forget every token at index >= ``tokens``."""
        ...

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, *, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a step's ``k, v`` ``[B, TQ, H, D]`` to ``layer``; ``shift``: write at ``length + shift[0]``
        (a CUDA-graph step, `graph_steps` stores only).

        Returns:
            what the Hugging Face cache hands on as the layer's keys and values ``[B, T, H, D]``.
        """
        ...

    def layer(self, layer: int, *, shift: torch.Tensor | None = None) -> LayerKV:
        """``layer``'s keys and values as the attention step reads them (after the step's `append`)."""
        ...

    def graph_steps(self) -> ShiftableStore | None:
        """This store, if it can run recorded CUDA-graph steps (`reattention_core.generation.cuda_graph`)."""
        ...


class ShiftableStore(KVStore, Protocol):
    """A store whose steps can be recorded once and replayed with a shift (its buffers never move)."""

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more tokens in every layer: a replayed step wrote them."""
        ...


class CachedStore(KVStore, Protocol):
    """A store the prefix cache keeps between prompts and restores pages into."""

    @property
    def maps_pages(self) -> bool:
        """Whether `adopt` keeps restored page tensors by reference (mapped files) instead of copying them."""
        ...

    def capacity(self, layer: int = 0) -> int:
        """Tokens ``layer`` holds before its buffers grow."""
        ...

    def nbytes(self, device_type: str | None = None) -> int:
        """Bytes allocated (capacity, not length); only those on ``device_type`` if given."""
        ...

    def view(self, layer: int) -> tuple[torch.Tensor | TokenSegments, torch.Tensor | TokenSegments]:
        """``(keys, values)`` ``[B, T, H, D]`` of what ``layer`` holds (no copy)."""
        ...

    def adopt(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
        """Append restored cache pages ``[B, T, H, D]`` (host tensors that stay valid and unchanged)."""
        ...

    def share_prefix(self, source: CachedStore, tokens: int) -> None:
        """Start this empty store with ``source``'s first ``tokens`` tokens (every layer)."""
        ...
