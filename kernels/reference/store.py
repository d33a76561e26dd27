"""Reference of the store write: append a step's keys and values at the store's (shifted) length."""

from __future__ import annotations

import torch


def append_kv_ref(
    keys: torch.Tensor,
    values: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    shift: torch.Tensor | None = None,
) -> None:
    """Write ``k, v`` ``[B, T, H, D]`` into rows ``start + shift[0] ...`` of ``keys, values`` ``[B, cap, H, D]``.

    ``shift`` (int64 ``[1]``, on the buffers' device) is added on the device, so this also runs
    inside a recorded CUDA graph; ``k`` and ``v`` are cast to the buffers' dtype.
    """
    pos = torch.arange(start, start + k.shape[1], device=keys.device)
    if shift is not None:
        pos = pos + shift
    keys.index_copy_(1, pos, k.to(keys.dtype))
    values.index_copy_(1, pos, v.to(values.dtype))
