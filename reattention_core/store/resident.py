"""`ResidentStore`: every layer's pre-RoPE keys and values, in preallocated, growing device buffers.

The whole sequence is kept (selection may pick any old token); appends write into spare capacity,
which grows geometrically, and `reserve` sizes it once when the final length is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reattention_core.attention import LayerKV, ScopePlan, Selection, attend_scope
from reattention_core.attention.selection import select_in_keys
from reattention_core.attention.step import LayerStep
from reattention_core.errors import StoreMemoryError
from reattention_core.store.protocol import CachedStore
from reattention_core.store.segments import TokenSegments
from reattention_kernels import append_kv

_MIN_CAPACITY = 256


def _out_of_memory(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _memory_advice(
    which: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool, exc: RuntimeError
) -> str:
    gib = torch.Size(shape).numel() * dtype.itemsize / 2**30
    where = "pinned host memory" if pin else str(device)
    head = (
        f"the KV store could not allocate {gib:.2f} GiB in {where} for one layer's {which} "
        f"({shape[1]:,} tokens): {str(exc).splitlines()[0]}. "
    )
    if device.type == "cuda":
        return head + (
            'Keep the store off the GPU: offload=OffloadConfig(keys="device") keeps only the keys there '
            "(half the memory, exact), OffloadConfig() keeps keys and values in host memory "
            "(CLI: --offload values | host); or shorten the context."
        )
    if pin:
        return head + (
            "Pinned memory is scarcer than host memory: OffloadConfig(pin=False) uses ordinary host "
            "memory (slower copies to the GPU); or shorten the context."
        )
    return head + "Host memory is full: shorten the context, or run on a machine with more memory."


class ResidentStore:
    """Per-layer pre-RoPE key/value buffers of shape ``[B, capacity, H, D]`` (a `KVStore`).

    Keys are stored without RoPE. A subclass may keep a layer's first tokens elsewhere (`OffloadedStore`
    adopts mapped cache pages): ``_base[layer]`` tokens then come before the buffer's first row, and
    lengths and capacities count them.

    Args:
        num_layers: number of attention layers.
        device: where the buffers live; ``None`` (default): where the first appended tokens are.
        pin: allocate the buffers in pinned host memory (``device`` must be the CPU).
    """

    def __init__(self, num_layers: int, *, device: torch.device | str | None = None, pin: bool = False) -> None:
        self.num_layers = num_layers
        self.device = None if device is None else torch.device(device)
        self.pin = pin
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers
        self._base = [0] * num_layers  # tokens held outside the buffers, before their first row
        self._reserved = 0
        self.grow_events = 0  # number of reallocations, exposed for tests and benchmarks

    @property
    def maps_pages(self) -> bool:
        """Whether `adopt` keeps restored cache pages by reference (`reattention_core.store.offloaded`): no."""
        return False

    def graph_steps(self) -> ResidentStore | None:
        """Itself: its buffers stay put once reserved, so steps can be recorded and replayed with a shift."""
        return self

    def layer(self, layer: int, *, shift: torch.Tensor | None = None) -> LayerKV:
        """``layer``'s tokens for the attention step; under a ``shift``, its whole buffers (the kernels
        read the stored rows through the shifted lengths)."""
        if shift is None:
            keys, values = self.buffer_view(layer)
            return ResidentLayer(keys, values, self._lengths[layer])
        whole_keys, whole_values = self._keys[layer], self._values[layer]
        if whole_keys is None or whole_values is None:
            raise RuntimeError(f"layer {layer} holds no tokens yet")
        return ResidentLayer(whole_keys, whole_values, self._lengths[layer])

    def length(self, layer: int = 0) -> int:
        """Tokens stored for ``layer``."""
        return self._lengths[layer]

    def capacity(self, layer: int = 0) -> int:
        """Tokens ``layer`` can hold before its buffers grow (``_base`` included)."""
        buf = self._keys[layer]
        return self._base[layer] + (0 if buf is None else buf.shape[1])

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens per layer, so appends up to that length never copy."""
        self._reserved = max(self._reserved, tokens)
        for layer in range(self.num_layers):
            if self._keys[layer] is not None and self.capacity(layer) < tokens:
                self._grow(layer, tokens - self._base[layer])

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, *, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` (``[B, TQ, H, D]``) to ``layer`` and return views of all stored tokens.

        ``shift`` (inside a recorded CUDA-graph step, `reattention_core.generation.cuda_graph`): write at
        ``length + shift[0]`` (a device index); the host length advances as if the write happened at
        ``length``, and the graph runner keeps the host lengths right at replay time (`advance`).

        Returns:
            ``(keys, values)``, each a ``[B, T, H, D]`` view (no copy) with ``T`` the new length; under
            a ``shift``, the layer's whole buffers ``[B, capacity, H, D]``.
        """
        if shift is not None:
            return self._append_shifted(layer, k, v, shift)
        self._write(layer, k, v, k.device, k.dtype)
        return self.buffer_view(layer)

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
        """Append ``k, v`` (``[B, T, H, D]``) that may live elsewhere (e.g. CPU pages read from disk).

        The buffers are allocated on ``device`` with ``dtype`` if the layer is still empty, and the
        tokens are copied straight into them (no intermediate tensor on the target device).
        """
        self._write(layer, k, v, device, dtype)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor, device: torch.device, dtype: torch.dtype) -> int:
        tq, base = k.shape[1], self._base[layer]
        if self._keys[layer] is None:
            cap = max(_MIN_CAPACITY, self._reserved - base, tq)
            device = self.device or device
            self._keys[layer] = self._new_buffer("keys", (k.shape[0], cap, k.shape[2], k.shape[3]), dtype, device)
            self._values[layer] = self._new_buffer("values", (v.shape[0], cap, v.shape[2], v.shape[3]), dtype, device)
        start = self._lengths[layer] - base  # buffer rows
        end = start + tq
        allocated = self._keys[layer]
        assert allocated is not None
        if end > allocated.shape[1]:
            self._grow(layer, max(end, 2 * allocated.shape[1]))
        keys, values = self._keys[layer], self._values[layer]
        assert keys is not None and values is not None
        # Pages restored from disk arrive in pinned host memory: copy them asynchronously, so the
        # next page's host work overlaps this transfer. PyTorch's pinned-memory allocator records
        # the copy, so the source block is not reused before the transfer has finished.
        keys[:, start:end].copy_(k, non_blocking=keys.is_cuda and not k.is_cuda and k.is_pinned())
        values[:, start:end].copy_(v, non_blocking=values.is_cuda and not v.is_cuda and v.is_pinned())
        self._lengths[layer] = base + end
        return base + end

    def adopt(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
        """Append restored cache pages ``[B, T, H, D]``: copied here, as `extend` does (see `maps_pages`)."""
        self.extend(layer, k, v, device=device, dtype=dtype)

    def share_prefix(self, source: CachedStore, tokens: int) -> None:
        """Start this empty store with a copy of ``source``'s first ``tokens`` tokens (every layer)."""
        self._require_empty("share_prefix")
        for layer in range(self.num_layers):
            k, v = source.view(layer)
            self.append(layer, k[:, :tokens], v[:, :tokens])

    def _require_empty(self, what: str) -> None:
        if any(self._lengths):
            raise RuntimeError(f"{what} needs an empty store")

    def _append_shifted(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._keys[layer], self._values[layer]
        start, tq = self._lengths[layer], k.shape[1]
        if keys is None or values is None or start + tq > keys.shape[1]:
            raise RuntimeError("a shifted append needs a layer whose buffers already hold the room (reserve first)")
        append_kv(keys, values, k, v, start, shift=shift)  # one Triton launch on CUDA
        self._lengths[layer] = start + tq
        return keys, values

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more tokens in every layer: a replayed CUDA-graph step wrote them."""
        if any(n + tokens > self.capacity(i) for i, n in enumerate(self._lengths)):
            raise RuntimeError(f"advancing by {tokens} tokens would pass the store's capacity")
        self._lengths = [n + tokens for n in self._lengths]

    def view(self, layer: int) -> tuple[torch.Tensor | TokenSegments, torch.Tensor | TokenSegments]:
        """``(keys, values)`` views ``[B, T, H, D]`` of what ``layer`` holds (`TokenSegments` in a store
        that keeps adopted cache pages apart, `reattention_core.store.offloaded`)."""
        return self.buffer_view(layer)

    def buffer_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` views ``[B, T, H, D]`` of the layer's buffers (the stored tokens in them)."""
        keys, values = self._keys[layer], self._values[layer]
        if keys is None or values is None:
            raise RuntimeError(f"layer {layer} holds no tokens yet")
        n = self._lengths[layer] - self._base[layer]
        return keys[:, :n], values[:, :n]

    def truncate(self, tokens: int) -> None:
        """Forget every token at index >= ``tokens`` (keeps the buffers for reuse)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        self._lengths = [min(n, tokens) for n in self._lengths]

    def min_length(self) -> int:
        """Tokens held by every layer (layers differ only while a forward pass is under way)."""
        return min(self._lengths) if self._lengths else 0

    def nbytes(self, device_type: str | None = None) -> int:
        """Bytes allocated by all buffers (capacity, not length); only those on ``device_type`` if given."""
        total = 0
        for buf in (*self._keys, *self._values):
            if buf is not None and (device_type is None or buf.device.type == device_type):
                total += buf.numel() * buf.element_size()
        return total

    def _new_buffer(self, which: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty ``"keys"`` or ``"values"`` buffer; subclasses may place the two apart."""
        pin = self.pin and device.type == "cpu"
        try:
            return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one; so are failed host and pinned allocations
            if not _out_of_memory(exc):
                raise
            raise StoreMemoryError(_memory_advice(which, shape, dtype, device, pin, exc)) from exc

    def _grow(self, layer: int, new_capacity: int) -> None:
        """Reallocate ``layer``'s buffers with ``new_capacity`` rows, keeping the stored ones."""
        old_k, old_v = self._keys[layer], self._values[layer]
        assert old_k is not None and old_v is not None
        n = self._lengths[layer] - self._base[layer]
        new_k = self._new_buffer("keys", (old_k.shape[0], new_capacity, *old_k.shape[2:]), old_k.dtype, old_k.device)
        new_v = self._new_buffer("values", (old_v.shape[0], new_capacity, *old_v.shape[2:]), old_v.dtype, old_v.device)
        new_k[:, :n] = old_k[:, :n]
        new_v[:, :n] = old_v[:, :n]
        self._keys[layer], self._values[layer] = new_k, new_v
        self.grow_events += 1


@dataclass(frozen=True)
class ResidentLayer:
    """A layer's keys and values on the queries' device (a `reattention_core.attention.LayerKV`).

    Attributes:
        keys, values: ``[B, T, H, D]`` stored tokens; under a shift, the whole buffers.
        total: tokens stored (the host's count under a shift).
    """

    keys: torch.Tensor
    values: torch.Tensor
    total: int

    def select(self, q: torch.Tensor, plan: ScopePlan, step: LayerStep) -> Selection:
        return select_in_keys(
            q, self.keys, plan, step.config, kernel_options=step.kernel_options, shift=step.shift,
            keep_hits=step.observer is not None,
        )  # fmt: skip

    def attend(self, q: torch.Tensor, plan: ScopePlan, selection: Selection, step: LayerStep) -> torch.Tensor:
        return attend_scope(
            q, self.keys, self.values, selection, step, sink_len=plan.sink_len, local_start=plan.local_start,
            length=None if step.shift is None else plan.total,
        )  # fmt: skip
