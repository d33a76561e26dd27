"""Exact selection over an offloaded middle: per-block key bounds on the device, keys fetched on demand.

When the key store does not fit on the GPU, the middle's keys live in host memory (pinned, or
memory-mapped spill files: ``OffloadConfig(spill_dir=...)``, or, for a prefix restored from the persistent
cache, the cache's own page files, mapped: `OffloadedStore.adopt`). The selection still needs, per query row and query
head, the exact top-k of ``q . k`` over all of them (`reattention_kernels.score_topk`). This module
gets that result while reading only a few blocks:

* `KeyBounds`: per block of ``S`` tokens and per KV head, the elementwise minimum and maximum of the
  pre-RoPE keys (``2 * D`` numbers per block and head, ``2 / S`` of the keys' size), kept on the
  device and updated as tokens are appended.
* For a query ``q``, ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` bounds the score of every key of the
  block from above (the bound of Quest, Tang et al. 2024).
* `candidate_topk` fetches the ``budget`` blocks with the highest bound (over all rows and heads
  of the chunk), scores them exactly with the same top-k op as the resident path, and then, with
  ``refine=True``, checks every block it did not fetch: if any could still hold a key that ranks
  at or above a row's k-th hit (its bound, plus a margin for fp32 rounding, reaches that score),
  those blocks are fetched too, until no row can change. The result is then identical to the
  top-k over the whole middle (the tests check it bit for bit, ties included); ``refine=False``
  stops after the first fetch (an approximation whose accuracy cost the evaluation harness
  measures).

``OffloadConfig(keys="device")`` is the other way: the keys stay on the device (selection is the
resident one, exact and fast) and only the values live in host memory, half the device memory.

In both, `offloaded_attention` copies the sink and the local window of the scope to the device on a
side stream while the selection runs (they are known in advance), and the selected blocks once the
selection is known (their indices have to reach the host first).

The engine uses it through `OffloadedStore` (``ReAttentionEngine(..., offload=OffloadConfig())``,
also for the stores of its prefix cache):
every layer's values (and with ``keys="host"`` its keys) stay in host memory, the bounds (or the
keys) on the compute device; per layer step `offloaded_attention` selects over the middle (with
`candidate_topk`, or the resident selection), then copies only the scope (sink, selected blocks,
local window) to the device and runs the same scope attention as the resident path on it, so with
an exact config (`OffloadConfig.exact`) the engine computes exactly what it computes without offload.

Shapes: queries ``[B, TQ, HQ, D]``, keys ``[B, M, H, D]``, ``HQ = G * H``; bounds ``[B, NB, H, D]``
with ``NB = ceil(M / S)``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from dataclasses import dataclass

import torch

from reattention_core.attention.layer import ScopePlan, plan_scope, select_for_plan
from reattention_core.config import ReAttentionConfig
from reattention_core.errors import InvalidInputError, StoreMemoryError
from reattention_core.attention.rope import RopeSpec
from reattention_core.store.segments import TokenSegments
from reattention_core.attention.selection import voting_rows
from reattention_core.store.resident import KVStore
from reattention_kernels import KernelOptions, scope_attention, score_topk, select_from_hits

# fp32 rounding of a D-term dot product is far below this share of sum_d |q_d| * max|k_d|.
_MARGIN = 1e-4


@dataclass(frozen=True)
class OffloadConfig:
    """How the engine keeps its KV store in host memory (see the module doc).

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
            and the store may be larger than RAM. The same results either way, but slower steps:
            on an H100 at 128K tokens (budget 64) restoring took 3.5 s instead of 7.2 s while
            decode took 284 instead of 133 ms/token (read from many page mappings; see
            benchmarks/README.md). Off by default: turn it on for corpora that do not fit in RAM.
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


class KeyBounds:
    """Elementwise min/max of the keys of each block of ``block`` tokens, per batch row and KV head.

    Args:
        block: tokens per block (the unit fetched from host memory).
        device: where the bounds live (the queries' device).
    """

    def __init__(self, block: int, device: torch.device | str) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = block
        self.device = torch.device(device)
        self.kmin: torch.Tensor | None = None  # [B, NB, H, D] fp32
        self.kmax: torch.Tensor | None = None
        self.tokens = 0

    @classmethod
    def of(cls, keys: torch.Tensor, block: int, device: torch.device | str | None = None) -> KeyBounds:
        """Bounds of ``keys`` ``[B, M, H, D]``, built in one go."""
        bounds = cls(block, keys.device if device is None else device)
        bounds.append(keys)
        return bounds

    def append(self, keys: torch.Tensor) -> None:
        """Extend the bounds with the next tokens ``[B, T, H, D]`` (any device, any chunking)."""
        t = keys.shape[1]
        if t == 0:
            return
        k = keys.to(self.device, torch.float32)
        s = self.block
        start = self.tokens
        first_block, last_block = start // s, (start + t - 1) // s
        nb = last_block + 1
        b, _, h, d = k.shape
        if self.kmin is None:
            self.kmin = torch.full((b, nb, h, d), float("inf"), device=self.device)
            self.kmax = torch.full((b, nb, h, d), float("-inf"), device=self.device)
        elif self.kmin.shape[1] < nb:
            grow = nb - self.kmin.shape[1]
            self.kmin = torch.cat([self.kmin, self.kmin.new_full((b, grow, h, d), float("inf"))], 1)
            self.kmax = torch.cat([self.kmax, self.kmax.new_full((b, grow, h, d), float("-inf"))], 1)
        assert self.kmax is not None
        # pad the chunk to whole blocks (padding never wins a min or a max), then reduce per block
        lead = start - first_block * s
        total = (last_block - first_block + 1) * s
        lo = k.new_full((b, total, h, d), float("inf"))
        hi = k.new_full((b, total, h, d), float("-inf"))
        lo[:, lead : lead + t] = k
        hi[:, lead : lead + t] = k
        span = slice(first_block, last_block + 1)
        lo = lo.view(b, -1, s, h, d).amin(2)
        hi = hi.view(b, -1, s, h, d).amax(2)
        self.kmin[:, span] = torch.minimum(self.kmin[:, span], lo)
        self.kmax[:, span] = torch.maximum(self.kmax[:, span], hi)
        self.tokens += t

    def truncate(self, tokens: int, keys: torch.Tensor) -> None:
        """Forget tokens from ``tokens`` on; ``keys`` ``[B, >= tokens, H, D]`` rebuild the last partial block."""
        if tokens >= self.tokens:
            return
        whole = tokens // self.block
        if self.kmin is not None and self.kmax is not None:
            self.kmin, self.kmax = self.kmin[:, :whole].clone(), self.kmax[:, :whole].clone()
        self.tokens = whole * self.block
        self.append(keys[:, self.tokens : tokens])

    @property
    def num_blocks(self) -> int:
        return 0 if self.kmin is None else self.kmin.shape[1]

    def _grouped(self, q: torch.Tensor) -> torch.Tensor:
        """fp32 queries ``[B, TQ, H, G, D]`` on the bounds' device (query heads grouped by KV head)."""
        if self.kmin is None or self.kmax is None:
            raise ValueError("no keys yet")
        b, tq, hq, d = q.shape
        h = self.kmin.shape[2]
        return q.to(self.device, torch.float32).view(b, tq, h, hq // h, d)

    def upper_bounds(self, q: torch.Tensor) -> torch.Tensor:
        """Per-block score bounds for queries ``[B, TQ, HQ, D]``: ``[B, TQ, HQ, NB]``."""
        qf = self._grouped(q)
        # [B, TQ, H, G, NB]: sum_d max(q_d kmax_d, q_d kmin_d) = q+ . kmax + q- . kmin
        ub = torch.einsum("bthgd,bnhd->bthgn", qf.clamp(min=0), self.kmax) + torch.einsum(
            "bthgd,bnhd->bthgn", qf.clamp(max=0), self.kmin
        )
        return ub.flatten(2, 3)

    def rounding_margins(self, q: torch.Tensor) -> torch.Tensor:
        """How far fp32 rounding may move a block's scores past `upper_bounds`: ``[B, TQ, HQ, NB]``."""
        qf = self._grouped(q)
        mag = torch.maximum(self.kmax.abs(), self.kmin.abs())
        return (_MARGIN * torch.einsum("bthgd,bnhd->bthgn", qf.abs(), mag) + 1e-30).flatten(2, 3)


@dataclass(frozen=True)
class CandidateResult:
    """``hits``: int64 ``[B, TQ, HQ, top_k]`` as `score_topk` returns them; ``fetched``: blocks read."""

    hits: torch.Tensor
    fetched: int
    rounds: int


def candidate_topk(
    q: torch.Tensor,
    keys: torch.Tensor,
    bounds: KeyBounds,
    top_k: int,
    *,
    budget: int,
    refine: bool = True,
    lo: int = 0,
    hi: int | None = None,
    kernel_options: KernelOptions | None = None,
) -> CandidateResult:
    """Top-k keys of ``q`` over ``keys[:, lo:hi]`` (host or device) reading only candidate blocks.

    Args:
        q: pre-RoPE queries ``[B, TQ, HQ, D]`` on the compute device.
        keys: pre-RoPE keys ``[B, T, H, D]`` (e.g. pinned host memory), of which ``bounds``
            covers at least the first ``hi``; the blocks are those of ``bounds`` (from token 0),
            so the range's first and last blocks may reach outside it (their bounds still hold).
        budget: blocks fetched first (the highest bounds over all rows and heads).
        refine: fetch more blocks until the result equals the full top-k (see the module doc).
        lo, hi: the token range scored (the middle of the store); ``hi`` defaults to ``T``.

    Returns:
        `CandidateResult` whose ``hits`` (relative to ``lo``) equal
        ``score_topk(q, keys[:, lo:hi], top_k)`` when ``refine``.
    """
    hi = keys.shape[1] if hi is None else hi
    if bounds.tokens < hi:
        raise ValueError(f"the bounds cover {bounds.tokens} tokens, the range ends at {hi}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not 0 <= lo < hi:
        raise ValueError(f"empty or negative token range [{lo}, {hi})")
    b, _, hq, _ = q.shape
    s = bounds.block
    first_block, last_block = lo // s, (hi - 1) // s
    span = slice(first_block, last_block + 1)
    ub = bounds.upper_bounds(q)[..., span]
    # what a block may score at most, rounding included (only refinement needs it)
    reach = ub + bounds.rounding_margins(q)[..., span] if refine else None
    nb = last_block - first_block + 1
    fetched = torch.zeros(nb, dtype=torch.bool, device=ub.device)
    fetched[ub.amax(dim=(0, 1, 2)).topk(min(budget, nb)).indices] = True
    rounds = 0
    while True:
        rounds += 1
        blocks = fetched.nonzero().squeeze(1).to(keys.device) + first_block  # ascending: ties keep index order
        idx = (blocks[:, None] * s + torch.arange(s, device=keys.device)).reshape(-1)
        idx = idx[(idx >= lo) & (idx < hi)]
        sub = _gather_to(keys, idx, q.device)
        local = score_topk(q, sub, top_k, kernel_options=kernel_options)
        idx = idx.to(q.device) - lo
        hits = torch.where(local >= 0, idx[local.clamp(min=0)], local)
        if reach is None or bool(fetched.all()):
            break
        # the k-th hit's score per row and head; -inf where fewer than top_k keys were fetched
        g = hq // sub.shape[2]
        last = local[..., -1]
        head = torch.arange(hq, device=q.device) // g
        k_last = sub[torch.arange(b, device=q.device)[:, None, None], last.clamp(min=0), head[None, None, :]]
        kth = (q.float() * k_last.float()).sum(-1)
        kth = torch.where(last >= 0, kth, torch.full_like(kth, float("-inf")))
        more = ((reach >= kth[..., None]) & ~fetched).any(dim=(0, 1, 2))
        if not bool(more.any()):
            break
        fetched |= more
    return CandidateResult(hits=hits, fetched=int(fetched.sum()), rounds=rounds)


class OffloadedStore(KVStore):
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
        self.bounds = [] if self.keys_on_device else [KeyBounds(config.block, self.compute_device) for _ in range(num_layers)]
        self.fetched_blocks = 0
        self.bounded_blocks = 0
        # per layer, the adopted page tensors [B, T_i, H, D] that come before the buffers
        self._mapped: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]

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

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` ``[B, T, H, D]``: tensors, or `TokenSegments` where pages are adopted."""
        if not self._mapped[layer]:
            return super().view(layer)
        ks = [k for k, _ in self._mapped[layer]]
        vs = [v for _, v in self._mapped[layer]]
        if self._lengths[layer] > self._base[layer]:
            k_tail, v_tail = super().view(layer)
            ks.append(k_tail)
            vs.append(v_tail)
        return TokenSegments(ks), TokenSegments(vs)  # type: ignore[return-value]

    def share_prefix(self, source: KVStore, tokens: int) -> None:
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

    def _new_buffer(
        self, which: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        if which == "keys" and self.keys_on_device:  # through the base class: a full device is a StoreMemoryError
            return super()._new_buffer(which, shape, dtype, self.compute_device)
        if self.config.spill_dir is not None:
            return _mapped_buffer(self.config.spill_dir, which, shape, dtype)
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


def _size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it at 1 or more (``"1.50 GiB"``, ``"135.3 KiB"``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{nbytes} bytes"


def _mapped_buffer(folder: str, which: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor backed by a new, already unlinked file in ``folder`` (disk space reserved)."""
    numel = torch.Size(shape).numel()
    nbytes = numel * dtype.itemsize
    fd, path = tempfile.mkstemp(prefix=f"reattention-{which}-", suffix=".kv", dir=folder)
    try:
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)  # a full disk fails here, not as SIGBUS on a later write
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # no fallocate on this filesystem
                os.ftruncate(fd, nbytes)
            else:
                raise StoreMemoryError(
                    f"the KV store could not reserve {_size(nbytes)} in {folder} for one layer's {which} "
                    f"({shape[1]:,} tokens): {exc.strerror or exc}. Free disk space there, choose another "
                    "spill_dir, or shorten the context."
                ) from exc
        flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps the data; nothing is left behind on exit or crash
    return flat.view(shape)


# One layer's cache update hands its offloaded store to the attention call that follows it in the
# same forward pass (no yield in between), so interleaved generations on one thread never mix.
_handoff = threading.local()


def hand_over(store: OffloadedStore, layer: int) -> None:
    _handoff.pending = (store, layer)


def take() -> tuple[OffloadedStore, int] | None:
    pending = getattr(_handoff, "pending", None)
    _handoff.pending = None
    return pending


def offloaded_attention(
    q: torch.Tensor,
    store: OffloadedStore,
    layer: int,
    cfg: ReAttentionConfig,
    rope: RopeSpec,
    scale: float,
    *,
    kernel_options: KernelOptions | None = None,
) -> torch.Tensor:
    """`reattention_core.attention.layer.reattention_attention` over an offloaded store.

    Args:
        q (torch.Tensor): pre-RoPE queries ``[B, TQ, HQ, D]`` (the last ``TQ`` stored tokens).

    Returns:
        torch.Tensor: ``[B, TQ, HQ, D]``, equal to the resident result when the config is exact
        (`OffloadConfig.exact`).
    """
    keys, values = store.view(layer)
    b, tq = q.shape[0], q.shape[1]
    total = keys.shape[1]
    plan = plan_scope(cfg, total, tq)
    dev = q.device
    k_scope, k_pending = _start_scope(keys, plan, cfg, dev)
    v_scope, v_pending = _start_scope(values, plan, cfg, dev)
    if plan.select and not store.keys_on_device:  # keys in host memory: through the block bounds
        res = candidate_topk(
            voting_rows(q, cfg.prefill_vote_stride), keys, store.bounds[layer], cfg.top_k,
            budget=store.config.budget, refine=store.config.refine, lo=plan.sink_len, hi=plan.local_start,
            kernel_options=kernel_options,
        )  # fmt: skip
        s = store.config.block
        store.fetched_blocks += res.fetched
        store.bounded_blocks += (plan.local_start - 1) // s - plan.sink_len // s + 1
        sel, n_sel = select_from_hits(
            res.hits.reshape(b, -1), plan.middle_len, cfg.max_blocks, cfg.block_size, plan.sink_len,
            kernel_options=kernel_options,
        )  # fmt: skip
    else:  # keys on the device: the resident selection
        sel, n_sel = select_for_plan(q, keys, plan, cfg, kernel_options=kernel_options)
    ns = sel.shape[1]
    # host buffers need host indices: one copy (which waits for the selection) serves keys and values
    on = {sel.device: sel}
    for buf in (keys, values):
        if buf.device not in on:
            on[buf.device] = sel.to(buf.device)
    _finish_scope(keys, k_scope, k_pending, plan, on[keys.device])
    _finish_scope(values, v_scope, v_pending, plan, on[values.device])
    if k_pending is not None:
        torch.cuda.current_stream(dev).wait_stream(k_pending)
    if v_pending is not None:
        torch.cuda.current_stream(dev).wait_stream(v_pending)
    # [sink | selected (NS rows, n_sel of them valid) | unused | local window]: positions follow
    # the count of valid entries, not the row, so the unused rows are never read
    sel_scope = torch.arange(plan.sink_len, plan.sink_len + ns, device=dev).expand(b, -1)
    out, _ = scope_attention(
        q, k_scope, v_scope, sel_scope, n_sel,
        sink_len=plan.sink_len, local_start=k_scope.shape[1] - (total - plan.local_start),
        inv_freq=rope.inv_freq, attention_scaling=rope.attention_scaling, scale=scale,
        kernel_options=kernel_options,
    )  # fmt: skip
    return out


def _scope_capacity(plan: ScopePlan, cfg: ReAttentionConfig) -> int:
    """Tokens of the largest scope of ``plan``: sink, the most positions a selection returns, local window."""
    ns = cfg.max_blocks * cfg.block_size if plan.select else 0  # padding included (`select_from_hits`)
    return plan.sink_len + ns + plan.total - plan.local_start


def _start_scope(
    buf: torch.Tensor, plan: ScopePlan, cfg: ReAttentionConfig, dev: torch.device
) -> tuple[torch.Tensor, torch.cuda.Stream | None]:
    """A device buffer for ``buf``'s scope ``[B, capacity, H, D]``, with sink and local window copied in.

    Those two parts are known before the selection runs, so for a host buffer in pinned memory
    they are copied on a side stream while the device computes the selection (the caller makes
    its stream wait for the returned one before reading the scope).
    """
    b, _, h, d = buf.shape
    cap = _scope_capacity(plan, cfg)
    out = torch.empty((b, cap, h, d), dtype=buf.dtype, device=dev)
    local = plan.total - plan.local_start
    sink_src, local_src = buf[:, : plan.sink_len], buf[:, plan.local_start :]
    stream = None
    if dev.type == "cuda" and not buf.is_cuda:
        # mapped cache pages are pageable: a copy from them would stall the host until the GPU caught up
        sink_src, local_src = _pinned(sink_src), _pinned(local_src)
        stream = _copy_stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))  # ``out`` was allocated on the compute stream
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out[:, : plan.sink_len].copy_(sink_src, non_blocking=True)
        out[:, cap - local :].copy_(local_src, non_blocking=True)
    return out, stream


def _finish_scope(
    buf: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream | None, plan: ScopePlan, idx: torch.Tensor
) -> None:
    """Copy the selected positions ``idx`` ``[B, NS]`` (on ``buf``'s device) of ``buf`` into ``out``
    right after the sink (`_start_scope` put the local window in the last rows of ``out``)."""
    b, ns = idx.shape
    if not ns:
        return
    rows = slice(plan.sink_len, plan.sink_len + ns)
    if buf.device == out.device:  # gathered straight into the scope
        for i in range(b):
            _gather_row(buf, i, idx[i], out[i : i + 1, rows])
        return
    # pinned staging whatever ``buf`` is (pinned buffers or mapped pages): the copy runs async
    staging = torch.empty((b, ns, *buf.shape[2:]), dtype=buf.dtype, pin_memory=out.is_cuda)
    for i in range(b):
        _gather_row(buf, i, idx[i], staging[i : i + 1])
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out[:, rows].copy_(staging, non_blocking=out.is_cuda)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in pinned host memory (itself if it already is; a copy from the caching host allocator if not)."""
    return t if t.is_pinned() else t.pin_memory()


def _gather_to(keys: torch.Tensor | TokenSegments, idx: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """``keys[:, idx]`` on ``dev``; from host memory to a GPU through pinned staging (an async copy)."""
    if dev.type != "cuda" or keys.is_cuda:
        return keys.index_select(1, idx).to(dev)
    staging = torch.empty((keys.shape[0], idx.numel(), *keys.shape[2:]), dtype=keys.dtype, pin_memory=True)
    if isinstance(keys, TokenSegments):
        keys.index_select(1, idx, out=staging)
    else:
        torch.index_select(keys, 1, idx, out=staging)
    # the caching host allocator keeps ``staging`` until the copy is done, so it may be freed at once
    return staging.to(dev, non_blocking=True)


def _gather_row(buf: torch.Tensor | TokenSegments, i: int, idx: torch.Tensor, out: torch.Tensor) -> None:
    """``out[0] = buf[i, idx]``: tokens ``idx`` ``[N]`` of batch row ``i`` into ``out`` ``[1, N, H, D]``."""
    if isinstance(buf, TokenSegments):  # adopted cache pages: read only the parts that hold ``idx``
        buf.row(i).index_select(1, idx, out=out)
    else:
        torch.index_select(buf[i], 0, idx, out=out[0])


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(dev: torch.device) -> torch.cuda.Stream:
    if dev not in _copy_streams:
        _copy_streams[dev] = torch.cuda.Stream(dev)
    return _copy_streams[dev]
