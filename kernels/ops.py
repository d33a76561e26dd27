"""The public ops of `reattention_kernels`, each dispatched (`dispatch.resolve_backend`, with the
backend of the `KernelOptions` passed) to a Triton kernel or its PyTorch reference.

Each op takes ``shift`` for CUDA graphs: an int64 ``[1]`` device tensor of the tokens the store has
gained since the host computed the lengths it passes (kernels/README.md, "Shifted lengths").
"""

from __future__ import annotations

import torch

from reattention_kernels.dispatch import resolve_backend
from reattention_kernels.options import DEFAULT_OPTIONS, KernelOptions
from reattention_kernels.reference import (
    append_kv_ref,
    scope_attention_ref,
    score_topk_ref,
    select_from_hits_ref,
)

# Largest [max_blocks, block_size] register tile of the fused selection kernel (powers of two).
_SELECT_MAX_TILE = 16384


def _pow2(d: int, least: int) -> bool:
    return d >= least and d & (d - 1) == 0


def _host_shift(shift: torch.Tensor | None) -> int:
    return 0 if shift is None else int(shift.reshape(-1)[0])


def _check_shift(shift: torch.Tensor | None, length: int | None, what: str) -> None:
    if shift is not None and (length is None or shift.dtype != torch.int64 or shift.numel() != 1):
        raise ValueError(f"a shifted {what} needs `length` (or middle_len) and an int64 shift tensor of one element")


# What each Triton kernel covers; ``auto`` takes the reference for anything else.
def _topk_covers(head_dim: int, top_k: int) -> bool:
    return _pow2(head_dim, 16) and 1 <= top_k <= 8


def _select_covers(max_blocks: int, block_size: int, options: KernelOptions) -> bool:
    tile = (1 << max(max_blocks - 1, 0).bit_length()) * (1 << max(block_size - 1, 0).bit_length())
    return tile <= _SELECT_MAX_TILE and options.triton_selection


def _attention_covers(head_dim: int) -> bool:
    return _pow2(head_dim, 32)


def shifted_steps_supported(
    head_dim: int, top_k: int, max_blocks: int, block_size: int, kernel_options: KernelOptions | None = None
) -> bool:
    """Whether every kernel takes its Triton path for these shapes, as a recorded CUDA-graph step needs.

    Shifted steps (``shift=``) read the shift on the device in the Triton kernels; the reference
    fallbacks read it on the host, which a stream under capture does not allow.
    """
    options = kernel_options or DEFAULT_OPTIONS
    return (
        _topk_covers(head_dim, top_k)
        and _select_covers(max_blocks, block_size, options)
        and _attention_covers(head_dim)
    )


def score_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    *,
    length: int | None = None,
    shift: torch.Tensor | None = None,
    kernel_options: KernelOptions | None = None,
) -> torch.Tensor:
    """Per-row, per-query-head top-k key indices; see `reference.topk.score_topk_ref` for the spec.

    Only the first ``length`` (+ ``shift``) keys of ``k`` are scored (default: all of them).
    ``auto`` falls back to the reference for shapes the kernel does not cover (head dim not a
    power of two >= 16, top_k > 8); an explicit ``"triton"`` request raises instead.
    """
    _check_shift(shift, length, "score_topk")
    options = kernel_options or DEFAULT_OPTIONS
    if resolve_backend(q, options.backend, supported=_topk_covers(q.shape[-1], top_k)) == "triton":
        from reattention_kernels.triton_ops.topk import score_topk_triton

        return score_topk_triton(q, k, top_k, length=length, shift=shift)
    if length is not None or shift is not None:
        k = k[:, : (k.shape[1] if length is None else length) + _host_shift(shift)]
    return score_topk_ref(q, k, top_k)


def select_from_hits(
    hits: torch.Tensor,
    middle_len: int,
    max_blocks: int,
    block_size: int,
    offset: int = 0,
    *,
    shift: torch.Tensor | None = None,
    max_middle_len: int | None = None,
    kernel_options: KernelOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected positions from top-k hits; see `reference.select.select_from_hits_ref` for the spec.

    With ``shift``, the middle is ``middle_len + shift`` long, at most ``max_middle_len``.

    ``auto`` uses the fused kernel on CUDA (unless ``triton_selection`` is off), and the reference
    elsewhere or when ``max_blocks x block_size`` (rounded up to powers of two) is over the kernel's
    register tile; an explicit ``"triton"`` request uses the fused kernel.
    """
    _check_shift(shift, middle_len, "select_from_hits")
    options = kernel_options or DEFAULT_OPTIONS
    supported = _select_covers(min(max_blocks, hits.shape[-1]), block_size, options)
    if resolve_backend(hits, options.backend, supported=supported) == "triton":
        from reattention_kernels.triton_ops.select import select_from_hits_triton

        return select_from_hits_triton(
            hits, middle_len, max_blocks, block_size, offset, shift=shift, max_middle_len=max_middle_len,
            small=options.small_selection,
        )  # fmt: skip
    return select_from_hits_ref(hits, middle_len + _host_shift(shift), max_blocks, block_size, offset)


def score_select(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    max_blocks: int,
    block_size: int,
    offset: int = 0,
    *,
    length: int | None = None,
    shift: torch.Tensor | None = None,
    kernel_options: KernelOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_topk` of ``q`` over the middle ``k``, then `select_from_hits` of each batch row's hits
    (``[B, TQ * HQ * top_k]``) over a middle of ``length`` (+ ``shift``) keys: ``(sel, n_sel)``.

    On the Triton path, with ``fuse_decode_selection``, a decode step whose selection fits runs as
    one kernel (the scoring's last program merges the key splits and selects); the result is the
    two ops' either way.
    """
    _check_shift(shift, length, "score_select")
    options = kernel_options or DEFAULT_OPTIONS
    middle_len = k.shape[1] if length is None else length
    fits = _topk_covers(q.shape[-1], top_k) and _select_covers(
        min(max_blocks, q.shape[1] * q.shape[2] * top_k), block_size, options
    )
    if resolve_backend(q, options.backend, supported=fits) == "triton" and fits:
        from reattention_kernels.triton_ops.topk import score_select_triton

        return score_select_triton(
            q, k, top_k, max_blocks, block_size, offset, length=length, shift=shift,
            fuse_selection=options.fuse_decode_selection, small_selection=options.small_selection,
        )  # fmt: skip
    hits = score_topk(q, k, top_k, length=length, shift=shift, kernel_options=options)
    return select_from_hits(
        hits.reshape(hits.shape[0], -1), middle_len, max_blocks, block_size, offset, shift=shift,
        max_middle_len=k.shape[1], kernel_options=options,
    )  # fmt: skip


def scope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel_idx: torch.Tensor,
    n_sel: torch.Tensor,
    *,
    sink_len: int,
    local_start: int,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    scale: float,
    return_lse: bool = False,
    length: int | None = None,
    shift: torch.Tensor | None = None,
    kernel_options: KernelOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sparse-scope attention; see `reference.attention.scope_attention_ref` for the spec.

    ``k`` and ``v`` hold ``length`` (+ ``shift``) stored tokens (default: all their rows); the
    local window starts at ``local_start`` (+ ``shift``).

    ``auto`` falls back to the reference when the head dim is not a power of two >= 32.
    """
    _check_shift(shift, length, "scope_attention")
    options = kernel_options or DEFAULT_OPTIONS
    kwargs = dict(
        sink_len=sink_len,
        local_start=local_start,
        inv_freq=inv_freq,
        attention_scaling=attention_scaling,
        scale=scale,
        return_lse=return_lse,
    )
    if resolve_backend(q, options.backend, supported=_attention_covers(q.shape[-1])) == "triton":
        from reattention_kernels.triton_ops.attention import scope_attention_triton

        return scope_attention_triton(
            q, k, v, sel_idx, n_sel, length=length, shift=shift, fuse_merge=options.fuse_decode_merge, **kwargs
        )
    if length is not None or shift is not None:
        s = _host_shift(shift)
        end = (k.shape[1] if length is None else length) + s
        k, v = k[:, :end], v[:, :end]
        kwargs["local_start"] = local_start + s
    return scope_attention_ref(q, k, v, sel_idx, n_sel, **kwargs)


def append_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    *,
    shift: torch.Tensor | None = None,
    kernel_options: KernelOptions | None = None,
) -> None:
    """Write ``k, v`` ``[B, T, H, D]`` at rows ``start (+ shift)`` of ``keys, values``; see
    `reference.store.append_kv_ref`. Both paths read ``shift`` on the device (graph-safe)."""
    if shift is not None and (shift.dtype != torch.int64 or shift.numel() != 1):
        raise ValueError("append_kv needs an int64 shift tensor of one element")
    if resolve_backend(keys, (kernel_options or DEFAULT_OPTIONS).backend) == "triton":
        from reattention_kernels.triton_ops.store import append_kv_triton

        append_kv_triton(keys, values, k, v, start, shift)
        return
    append_kv_ref(keys, values, k, v, start, shift)
