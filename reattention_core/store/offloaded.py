"""`OffloadedStore`: a KV store whose values (and, by default, keys) live in host memory.

For contexts whose KV store does not fit on the device. Each layer step copies only its scope to the
device (`reattention_core.store.scope_copy`) and runs the resident scope attention on it, so with an
exact config (`OffloadConfig.exact`) the engine computes what it computes without offload.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from reattention_core.attention import LayerKV, ScopePlan, Selection, attend_scope
from reattention_core.attention.selection import select_from_middle_hits, select_in_keys
from reattention_core.attention.step import LayerStep
from reattention_core.errors import InvalidInputError
from reattention_core.store.bounds import KeyBounds, candidate_topk
from reattention_core.store.protocol import CachedStore
from reattention_core.store.resident import ResidentStore
from reattention_core.store.scope_copy import finish_scope, start_scope
from reattention_core.store.segments import TokenSegments
from reattention_core.store.spill import spill_buffer


@dataclass(frozen=True)
class OffloadConfig:
    """How the engine keeps its KV store in host memory.

    Args:
        keys: ``"host"`` (default): keys and values in host memory, selection through per-block
            key bounds on the device (``block``, ``budget``, ``refine``); the device holds only
            the bounds. ``"device"``: the keys stay on the device and only the values go to host
            memory; selection is the resident one (exact, no bounds, at the speed of the device),
            and each step copies only the scope's values. Half the device memory of a resident
            store, and no accuracy cost.
        block: tokens per bounded block (the unit read from host memory for scoring).
        budget: blocks read first per layer step (the highest bounds).
        refine: read more blocks until the selection is exact (identical to the resident engine);
            ``False`` keeps only the budget (faster, approximate).
        pin: pinned host buffers (fast, asynchronous copies); ``None``: when CUDA is available.
        spill_dir: keep the host-side buffers in memory-mapped files in this folder instead of
            host memory, so the store may outgrow RAM (the OS pages them in and out; copies to the
            device are not asynchronous). The files are unlinked as soon as they are mapped, so
            nothing is left behind, and their disk space is reserved up front (a full disk is a
            `StoreMemoryError`, never a crash mid-generation).
        map_pages: with ``keys="host"``, a prefix restored from the persistent cache's page files
            stays in those files (memory-mapped, read-only, see `OffloadedStore`) instead of being
            copied into pinned host buffers: restoring a corpus costs no host memory of its own,
            and the store may be larger than RAM. The same results either way, but faster restores
            and slower steps (selection reads from many page mappings). Off by default: turn it on
            for corpora that do not fit in RAM.
    """

    keys: str = "host"
    block: int = 64
    budget: int = 64
    refine: bool = True
    pin: bool | None = None
    spill_dir: str | None = None
    map_pages: bool = False

    @property
    def exact(self) -> bool:
        """Whether selection equals the resident engine's (so cache pages can be shared)."""
        return self.keys == "device" or self.refine

    def __post_init__(self) -> None:
        if self.keys not in ("host", "device"):
            raise InvalidInputError(f'OffloadConfig.keys must be "host" or "device", got {self.keys!r}')
        for name in ("block", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"OffloadConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("refine", "map_pages"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"OffloadConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.spill_dir is not None:
            if not isinstance(self.spill_dir, (str, os.PathLike)):
                raise InvalidInputError(f"OffloadConfig.spill_dir must be a folder path, got {self.spill_dir!r}")
            if not os.path.isdir(self.spill_dir):
                raise InvalidInputError(
                    f"OffloadConfig.spill_dir {str(self.spill_dir)!r} is not an existing folder: create it first "
                    "(on a fast local disk with room for the KV store)"
                )
            object.__setattr__(self, "spill_dir", os.fspath(self.spill_dir))


class OffloadedStore(ResidentStore):
    """A `KVStore` whose values (and, with ``keys="host"``, keys) live in host memory.

    With ``keys="host"`` each layer also keeps `KeyBounds` on ``device``; with ``keys="device"``
    the key buffers are allocated on ``device`` instead and no bounds are kept.

    **Mapped pages** (``keys="host"``, ``map_pages=True``): a prefix restored from the persistent cache is not copied
    into host buffers; `adopt` keeps the page files' memory-mapped tensors as the layer's first
    tokens (``_base``), and only the tokens after them (question, answer) go to the buffers. A
    restored corpus then costs no host memory of its own: the OS pages it in from the files as
    selection reads it, and drops it again under memory pressure, so the store may be larger than
    RAM. The mappings are private (copy-on-write) and never written, so the cache files cannot
    change; a page file evicted from the cache while mapped stays readable until the store lets
    go of it. `view` returns `TokenSegments` for such layers.

    Attributes:
        fetched_blocks, bounded_blocks: blocks read by selections so far and blocks they could
            have read (the share read is what offload saves in transfers; ``keys="host"`` only).
    """

    def __init__(self, num_layers: int, config: OffloadConfig, device: torch.device | str) -> None:
        pin = config.pin if config.pin is not None else torch.cuda.is_available()
        super().__init__(num_layers, device="cpu", pin=pin)
        self.config = config
        self.compute_device = torch.device(device)
        self.keys_on_device = config.keys == "device"
        self.bounds = (
            [] if self.keys_on_device else [KeyBounds(config.block, self.compute_device) for _ in range(num_layers)]
        )
        self.fetched_blocks = 0
        self.bounded_blocks = 0
        # per layer, the adopted page tensors [B, T_i, H, D] that come before the buffers
        self._mapped: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}

    def graph_steps(self) -> None:
        """None: steps copy their scope from host memory, which a recorded graph cannot replay."""
        return None

    def layer(self, layer: int, *, shift: torch.Tensor | None = None) -> LayerKV:
        if shift is not None:
            raise RuntimeError("an offloaded store runs no CUDA-graph steps (its graph_steps() is None)")
        return OffloadedLayer(self, layer)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, *, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` ``[B, TQ, H, D]``; returns views of the layer's buffers, or where cache pages
        are adopted (never joined into one tensor), the step's own ``k, v``."""
        if shift is not None:
            raise RuntimeError("an offloaded store runs no CUDA-graph steps (its graph_steps() is None)")
        self._write(layer, k, v, k.device, k.dtype)
        return (k, v) if self._mapped[layer] else self.buffer_view(layer)

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream that copies scopes to ``device`` while it selects."""
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        return self._copy_streams[device]

    @property
    def maps_pages(self) -> bool:
        """Whether `adopt` keeps restored pages mapped (``keys="host"`` and ``map_pages``)."""
        return not self.keys_on_device and self.config.map_pages

    def mapped_tokens(self, layer: int = 0) -> int:
        """Tokens of ``layer`` held in adopted page mappings (not in host buffers)."""
        return self._base[layer]

    def adopt(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
        """Append host tensors ``[B, T, H, D]`` that stay valid and unchanged (mapped cache pages) by reference.

        Only while every token of ``layer`` is adopted (none written to its buffers yet) and only
        for `maps_pages` stores; otherwise the tokens are copied, as `extend` does.
        """
        mappable = (
            self.maps_pages and self._lengths[layer] == self._base[layer] and k.device.type == "cpu"
            and k.dtype == v.dtype == dtype and v.device.type == "cpu"
        )  # fmt: skip
        if not mappable:
            self.extend(layer, k, v, device=device, dtype=dtype)
            return
        self.bounds[layer].append(k)
        self._mapped[layer].append((k, v))
        t = k.shape[1]
        self._base[layer] += t
        self._lengths[layer] += t

    def view(self, layer: int) -> tuple[torch.Tensor | TokenSegments, torch.Tensor | TokenSegments]:
        """``(keys, values)`` ``[B, T, H, D]``: tensors, or `TokenSegments` where pages are adopted."""
        if not self._mapped[layer]:
            return self.buffer_view(layer)
        ks = [k for k, _ in self._mapped[layer]]
        vs = [v for _, v in self._mapped[layer]]
        if self._lengths[layer] > self._base[layer]:
            k_tail, v_tail = self.buffer_view(layer)
            ks.append(k_tail)
            vs.append(v_tail)
        return TokenSegments(ks), TokenSegments(vs)

    def share_prefix(self, source: CachedStore, tokens: int) -> None:
        """Start this empty store with ``source``'s first ``tokens`` tokens, sharing its adopted pages."""
        if not (self.maps_pages and isinstance(source, OffloadedStore)):
            super().share_prefix(source, tokens)
            return
        self._require_empty("share_prefix")
        for layer in range(self.num_layers):
            for k, v in _pages_upto(source._mapped[layer], tokens):
                self.adopt(layer, k, v, device=k.device, dtype=k.dtype)
            at = self._lengths[layer]
            if at < tokens:  # the rest lives in the source's buffers: copied
                keys, values = source.view(layer)
                self.append(layer, keys[:, at:tokens], values[:, at:tokens])

    def _new_buffer(self, which: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if which == "keys" and self.keys_on_device:  # through the base class: a full device is a StoreMemoryError
            return super()._new_buffer(which, shape, dtype, self.compute_device)
        if self.config.spill_dir is not None:
            return spill_buffer(self.config.spill_dir, which, shape, dtype)
        return super()._new_buffer(which, shape, dtype, device)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, device: torch.device, dtype: torch.dtype) -> int:
        if self.bounds:  # every append and extend comes through here
            self.bounds[layer].append(k)
        return super()._write(layer, k, v, device, dtype)

    def truncate(self, tokens: int) -> None:
        """Forget every token at index >= ``tokens`` (adopted pages past it are let go)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        for layer, mapped in enumerate(self._mapped):
            if tokens < self._base[layer]:
                self._mapped[layer] = _pages_upto(mapped, tokens)
                self._base[layer] = self._lengths[layer] = tokens
        super().truncate(tokens)
        for layer, bounds in enumerate(self.bounds):
            if not self.length(layer):
                self.bounds[layer] = KeyBounds(bounds.block, bounds.device)
            elif bounds.tokens > self.length(layer):
                bounds.truncate(self.length(layer), self.view(layer)[0])


class OffloadedLayer:
    """One layer of an `OffloadedStore` for one attention step (a `reattention_core.attention.LayerKV`).

    Selection scores the middle through the block bounds (keys in host memory) or on the device
    (``keys="device"``); the scope's sink and local window start copying to the device before that,
    on a side stream, and the selected blocks follow in `attend`.
    """

    def __init__(self, store: OffloadedStore, layer: int) -> None:
        self.store, self.index = store, layer
        self.keys, self.values = store.view(layer)
        self.total = store.length(layer)
        self._scope: tuple[torch.Tensor, torch.cuda.Stream | None, torch.Tensor, torch.cuda.Stream | None] | None = None

    def _start(
        self, plan: ScopePlan, step: LayerStep, dev: torch.device
    ) -> tuple[torch.Tensor, torch.cuda.Stream | None, torch.Tensor, torch.cuda.Stream | None]:
        """The scope buffers with sink and local window on their way (started once per step)."""
        if self._scope is None:
            k_scope, k_pending = start_scope(self.keys, plan, step.config, dev, self.store.copy_stream)
            v_scope, v_pending = start_scope(self.values, plan, step.config, dev, self.store.copy_stream)
            self._scope = (k_scope, k_pending, v_scope, v_pending)
        return self._scope

    def select(self, q: torch.Tensor, plan: ScopePlan, step: LayerStep) -> Selection:
        store, cfg = self.store, step.config
        self._start(plan, step, q.device)
        if store.keys_on_device:  # the resident selection
            assert isinstance(self.keys, torch.Tensor)  # keys on the device are never adopted pages
            return select_in_keys(
                q, self.keys, plan, cfg, kernel_options=step.kernel_options, keep_hits=step.observer is not None
            )
        res = candidate_topk(
            q, self.keys, store.bounds[self.index], cfg.top_k, budget=store.config.budget, refine=store.config.refine,
            lo=plan.sink_len, hi=plan.local_start, kernel_options=step.kernel_options,
        )  # fmt: skip
        s = store.config.block
        store.fetched_blocks += res.fetched
        store.bounded_blocks += (plan.local_start - 1) // s - plan.sink_len // s + 1
        return select_from_middle_hits(res.hits, plan, cfg, kernel_options=step.kernel_options)

    def attend(self, q: torch.Tensor, plan: ScopePlan, selection: Selection, step: LayerStep) -> torch.Tensor:
        dev = q.device
        k_scope, k_pending, v_scope, v_pending = self._start(plan, step, dev)
        sel = selection.sel
        # host buffers need host indices: one copy (which waits for the selection) serves keys and values
        on = {sel.device: sel}
        for buf in (self.keys, self.values):
            if buf.device not in on:
                on[buf.device] = sel.to(buf.device)
        finish_scope(self.keys, k_scope, k_pending, plan, on[self.keys.device])
        finish_scope(self.values, v_scope, v_pending, plan, on[self.values.device])
        for pending in (k_pending, v_pending):
            if pending is not None:
                torch.cuda.current_stream(dev).wait_stream(pending)
        # [sink | selected (NS rows, n_sel of them valid) | unused | local window]: positions follow
        # the count of valid entries, not the row, so the unused rows are never read
        sel_scope = torch.arange(plan.sink_len, plan.sink_len + sel.shape[1], device=dev).expand(q.shape[0], -1)
        return attend_scope(
            q, k_scope, v_scope, Selection(sel_scope, selection.n_sel), step, sink_len=plan.sink_len,
            local_start=k_scope.shape[1] - (self.total - plan.local_start),
        )  # fmt: skip


def _pages_upto(pages: list[tuple[torch.Tensor, torch.Tensor]], tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(k, v)`` pages ``[B, T_i, H, D]`` that hold the first ``tokens`` tokens, the last one cut (views)."""
    kept, at = [], 0
    for k, v in pages:
        if at >= tokens:
            break
        n = min(k.shape[1], tokens - at)
        kept.append((k[:, :n], v[:, :n]))
        at += n
    return kept


def make_store(num_layers: int, offload: OffloadConfig | None, device: torch.device) -> ResidentStore:
    """An empty store for a model on ``device``: resident, or offloaded as ``offload`` says."""
    return ResidentStore(num_layers) if offload is None else OffloadedStore(num_layers, offload, device)
