"""A KV store whose sequence is split across ranks.

Layout: contiguous shards. Rank ``r`` of ``W`` holds global tokens
``[r * P, (r + 1) * P)`` (the last rank everything from ``(W - 1) * P`` on), with ``P`` chosen
from the expected length (prompt + completion) so the shards come out even. Every rank runs the
whole model, so every rank sees every chunk's keys and values; each keeps only the tokens it
owns, in an ordinary `KVStore`. Contiguous shards keep the selection and attention code simple
(a shard is one slice of the global sequence), and decode tokens, which all land on the last
rank, are few next to the prompt.

`ShardedKVStore` has the `KVStore` methods `reattention_core.hf.ReAttentionCache` calls
(``num_layers``, ``append``, ``length``, ``truncate``), so the ordinary cache wraps it: the model
sees global lengths, the attention function receives this rank's shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from reattention_core.errors import InvalidInputError
from reattention_core.store.resident import KVStore


@dataclass(frozen=True)
class ShardLayout:
    """Which global tokens one rank holds: ``[start, stop)`` (``stop=None``: to the end).

    Args:
        rank, world: this rank and the number of ranks.
        tokens_per_rank: ``P`` above.
    """

    rank: int
    world: int
    tokens_per_rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world or self.tokens_per_rank < 1:
            raise InvalidInputError(f"bad shard layout: rank {self.rank} of {self.world}, {self.tokens_per_rank} per rank")

    @classmethod
    def balanced(cls, expected_tokens: int, rank: int, world: int) -> ShardLayout:
        """Even shards for a sequence of about ``expected_tokens`` tokens."""
        return cls(rank, world, max(1, math.ceil(expected_tokens / world)))

    @property
    def start(self) -> int:
        return self.rank * self.tokens_per_rank

    @property
    def stop(self) -> int | None:
        return None if self.rank == self.world - 1 else self.start + self.tokens_per_rank


class ShardedKVStore:
    """This rank's shard of every layer's pre-RoPE keys and values, plus the global lengths."""

    def __init__(self, num_layers: int, layout: ShardLayout) -> None:
        self.layout = layout
        self.local = KVStore(num_layers)
        self.num_layers = num_layers
        self._global = [0] * num_layers

    def reserve(self, tokens: int) -> None:
        """Room for a global sequence of ``tokens`` (only this rank's part is allocated)."""
        stop = self.layout.stop if self.layout.stop is not None else tokens
        self.local.reserve(max(0, min(tokens, stop) - self.layout.start))

    def length(self, layer: int = 0) -> int:
        """Tokens of ``layer`` in the whole (global) sequence: what the model's positions count."""
        return self._global[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chunk ``[B, TQ, H, D]`` (the same on every rank); keep the owned part.

        Returns:
            this rank's shard ``(keys, values)`` ``[B, S, H, D]`` after the append (``S`` may be 0);
            it starts at global token `layout.start`.
        """
        g0 = self._global[layer]
        g1 = g0 + k.shape[1]
        stop = self.layout.stop if self.layout.stop is not None else g1
        a, b = max(g0, self.layout.start), min(g1, stop)
        self._global[layer] = g1
        if b > a or self.local.capacity(layer) == 0:  # an empty append allocates the (empty) buffers
            a, b = (a, b) if b > a else (g0, g0)
            return self.local.append(layer, k[:, a - g0 : b - g0], v[:, a - g0 : b - g0])
        return self.local.view(layer)

    def truncate(self, tokens: int) -> None:
        self._global = [min(n, tokens) for n in self._global]
        self.local.truncate(max(0, tokens - self.layout.start))
