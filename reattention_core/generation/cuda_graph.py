"""Decode steps and prefill chunks as CUDA graphs: record a step once, replay it for every later one.

A step launches hundreds of small kernels through Python, so the host sets its pace; a graph replays
them from one call. `GraphPolicy` decides where graphs apply; `StepGraph` says how one recording
serves every step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from reattention_core.attention import plan_scope, shiftable
from reattention_core.config import ReAttentionConfig
from reattention_core.hf import ReAttentionCache
from reattention_core.hf._compat import cache_argument
from reattention_core.hf.architectures import model_config
from reattention_core.store import KVStore
from reattention_kernels import KernelOptions, resolve_backend, shifted_steps_supported

ENV_VAR = "REATTENTION_CUDA_GRAPHS"
# A step graph costs about three eager steps (warm-up, recording, first replay); fewer steps run eagerly.
MIN_STEPS = 4


def graphs_enabled() -> bool:
    """``REATTENTION_CUDA_GRAPHS=0`` turns step graphs off: the default of an engine's ``cuda_graphs``
    (the only place the variable is read)."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", ""):
        raise ValueError(f"{ENV_VAR}={value!r}: use 1 (default) or 0")
    return value not in ("0", "off", "false")


class StepGraph:
    """Forward steps of ``tokens`` tokens of ``model`` over ``cache``'s store, replayed
    from a CUDA graph: one-token decode steps, or the full-size chunks of a prefill.

    One recording serves all steps because the store's buffers do not move (``max_length`` is
    reserved), a step's size does not change (other sizes run eagerly), and every changing length
    lives on the device: recorded at store length ``n0``, each replay sets ``shift`` (int64 ``[1]``)
    to ``n - n0``; the cache carries it (`ReAttentionCache.shifted`), the store writes at
    ``n0 + shift`` and the kernels add it to the middle's length and the local window's start. The
    scope keeps its length, so the grids stay right.

    The first step whose scope can shift (the store then holds more than sink + local window) runs
    once eagerly to compile and warm every kernel, is then recorded, and is replayed; later steps
    only replay. Steps of another size, steps before that point and steps past ``max_length`` run
    eagerly. ``record=False`` runs what each replay would run, eagerly (the host lengths of the
    first shiftable step, the rest in ``shift``): the same arithmetic without a graph, which is how
    the path is tested without a GPU.

    Args:
        model: the model, under `enable_reattention`.
        cache: its `ReAttentionCache`, over a store that runs graph steps (`KVStore.graph_steps`).
        config: the ReAttention settings the model runs with.
        max_length: the most tokens the store will hold; it is reserved before recording.
        tokens: tokens per recorded step (1 for decode, the prefill chunk size for prefill).
        record: record a CUDA graph (needs CUDA); ``False``: emulated replays.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: ReAttentionCache,
        config: ReAttentionConfig,
        max_length: int,
        *,
        tokens: int = 1,
        record: bool = True,
    ) -> None:
        store = cache.store.graph_steps()
        if store is None:
            kind = type(cache.store).__name__
            raise TypeError(f"step graphs need a resident KVStore (its buffers stay put), not {kind}")
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        self.model, self.cache, self.store, self.config = model, cache, store, config
        self.max_length = max_length
        self.tokens = tokens
        self.record = record
        device = next(model.parameters()).device
        if record and device.type != "cuda":
            raise ValueError("recording a step graph needs the model on a CUDA device")
        self.device = device
        self.shift = torch.zeros(1, dtype=torch.int64, device=device)
        self.ids = torch.zeros((1, tokens), dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.base: int | None = None
        self.replays = 0

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, **cache_argument(self.model, self.cache), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def step_token(self, token: int) -> torch.Tensor:
        """Feed one token (a decode step); see `step`."""
        if self.tokens != 1:
            raise ValueError(f"this graph runs steps of {self.tokens} tokens, not one")
        self.ids.fill_(token)  # a kernel with the id as its argument: no host-to-device copy
        return self.step(self.ids)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids [1, T]`` (on the model's device); returns fp32 logits ``[1, V]`` of the last
        one (a buffer the next step overwrites)."""
        n, tq = self.store.min_length(), ids.shape[1]
        if tq != self.tokens or n + tq > self.max_length or not shiftable(plan_scope(self.config, n + tq, tq)):
            return self._forward(ids)
        if ids is not self.ids:
            self.ids.copy_(ids)
        if not self.record:
            return self._emulated_replay(n)
        if self.graph is None:
            self._record(n)
        assert self.graph is not None and self.logits is not None and self.base is not None
        self.shift.fill_(n - self.base)
        self.graph.replay()
        self.store.advance(tq)
        self.replays += 1
        return self.logits

    def _emulated_replay(self, n: int) -> torch.Tensor:
        # What a replay does, eagerly: the host sees the store at the first shiftable length (the
        # recording's lengths) and the shift carries the rest, so every kernel gets a replay's arguments.
        if self.base is None:
            self.store.reserve(self.max_length)
            self.base = n
        self.store.truncate(self.base)
        self.shift.fill_(n - self.base)
        with self.cache.shifted(self.shift):
            logits = self._forward(self.ids)
        self.store.advance(n - self.base)
        self.replays += 1
        return logits

    def _record(self, n: int) -> None:
        self.store.reserve(self.max_length)
        self.shift.zero_()
        # Warm up on a side stream (as torch.cuda.graphs asks): Triton compiles the shifted kernel
        # variants here, and lazily made tables (RoPE) exist before recording. It stores the step's
        # tokens at n, which the first replay writes again.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self.cache.shifted(self.shift):
            self._forward(self.ids)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.store.truncate(n)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self.cache.shifted(self.shift):
            self.logits = self._forward(self.ids)
        self.store.truncate(n)  # recording launched nothing: the lengths it counted are not stored
        self.graph, self.base = graph, n


@dataclass(frozen=True)
class GraphPolicy:
    """Where a generation's steps replay CUDA graphs (`StepGraph`), and the graphs for them.

    Graphs apply on CUDA, for a store that runs graph steps, where every kernel takes its Triton path
    for the model's shapes (a fallback kernel would read a step's shift on the host, inside the
    capture), and not with ``mode="full"`` or when ``enabled`` is off.
    """

    model: torch.nn.Module
    config: ReAttentionConfig
    kernel_options: KernelOptions
    enabled: bool = True

    def applies(self, store: KVStore) -> bool:
        device = next(self.model.parameters()).device
        cfg = self.config
        if not self.enabled or cfg.mode == "full" or device.type != "cuda" or store.graph_steps() is None:
            return False
        mc = model_config(self.model)
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        if not shifted_steps_supported(head_dim, cfg.top_k, cfg.max_blocks, cfg.block_size, self.kernel_options):
            return False
        return resolve_backend(torch.empty(0, device=device), self.kernel_options.backend) == "triton"

    def prefill(self, cache: ReAttentionCache, num_tokens: int, max_length: int) -> StepGraph | None:
        """A graph for the full-size chunks of a ``num_tokens`` prefill, where enough of them can shift."""
        chunk = self.config.prefill_chunk_size
        shiftable_from = self.config.sink_size + max(self.config.local_window, chunk)
        if (num_tokens - shiftable_from) // chunk < MIN_STEPS or not self.applies(cache.store):
            return None
        return StepGraph(self.model, cache, self.config, max_length, tokens=chunk)

    def decode(self, cache: ReAttentionCache, max_length: int, steps: int) -> StepGraph | None:
        """A one-token graph for ``steps`` decode steps, where there are enough of them."""
        if steps < MIN_STEPS or not self.applies(cache.store):
            return None
        return StepGraph(self.model, cache, self.config, max_length, tokens=1)


__all__ = ["GraphPolicy", "StepGraph", "graphs_enabled"]
