"""Triton store write: a step's keys and values into the store's buffers in one launch.

A CUDA-graph step appends through `append_kv` at ``start + shift[0]``. The reference needs four
kernels per layer for that (the positions, their shift, and one ``index_copy_`` each for keys and
values); here one program copies one token's keys and values, reading the shift on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _append_kv(
    k_ptr, v_ptr, keys_ptr, values_ptr, shift_ptr, start, T, H: tl.constexpr, D: tl.constexpr,
    skb, skt, skh, skd, svb, svt, svh, svd,
    sKb, sKt, sKh, sVb, sVt, sVh,
    BLOCK: tl.constexpr, SHIFT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * T + t
    b = row // T
    t = row % T
    pos = (start + t).to(tl.int64)
    if SHIFT:
        pos += tl.load(shift_ptr)
    offs = tl.arange(0, BLOCK)
    mask = offs < H * D
    h = offs // D
    d = offs % D
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    kv = tl.load(k_ptr + b64 * skb + t64 * skt + h * skh + d * skd, mask=mask)
    vv = tl.load(v_ptr + b64 * svb + t64 * svt + h * svh + d * svd, mask=mask)
    # the buffers' last dim is contiguous (the store allocates them)
    tl.store(keys_ptr + b64 * sKb + pos * sKt + h * sKh + d, kv.to(keys_ptr.dtype.element_ty), mask=mask)
    tl.store(values_ptr + b64 * sVb + pos * sVt + h * sVh + d, vv.to(values_ptr.dtype.element_ty), mask=mask)


def append_kv_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    shift: torch.Tensor | None = None,
) -> None:
    """See `reattention_kernels.reference.store.append_kv_ref`; the same result in one launch."""
    b, t, h, d = k.shape
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("append_kv writes into buffers whose last dim is contiguous")
    if b * t == 0:
        return
    _append_kv[(b * t,)](
        k, v, keys, values, keys if shift is None else shift, start, t, h, d,
        *k.stride(), *v.stride(), *keys.stride()[:3], *values.stride()[:3],
        BLOCK=triton.next_power_of_2(h * d), SHIFT=shift is not None, num_warps=4 if h * d >= 1024 else 1,
    )  # fmt: skip
