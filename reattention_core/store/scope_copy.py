"""Copying one layer step's scope from host memory to the device (`OffloadedStore`'s attention).

Sink and local window are known before the selection runs, so for host buffers in pinned memory
they are copied on a side stream while the device selects; the selected blocks follow once their
indices have reached the host. The scope buffer is ``[sink | selected (room for the most a selection
returns) | local window]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from reattention_core.attention import ScopePlan
from reattention_core.config import ReAttentionConfig
from reattention_core.store.segments import TokenSegments


def scope_capacity(plan: ScopePlan, cfg: ReAttentionConfig) -> int:
    """Tokens of the largest scope of ``plan``: sink, the most positions a selection returns, local window."""
    ns = cfg.max_blocks * cfg.block_size if plan.select else 0  # padding included (`select_from_hits`)
    return plan.sink_len + ns + plan.total - plan.local_start


def start_scope(
    buf: torch.Tensor | TokenSegments,
    plan: ScopePlan,
    cfg: ReAttentionConfig,
    dev: torch.device,
    copy_stream: Callable[[torch.device], torch.cuda.Stream],
) -> tuple[torch.Tensor, torch.cuda.Stream | None]:
    """A device buffer for ``buf``'s scope ``[B, capacity, H, D]``, with sink and local window copied in.

    Those two parts are known before the selection runs, so for a host buffer in pinned memory
    they are copied on a side stream while the device computes the selection (the caller makes
    its stream wait for the returned one before reading the scope).
    """
    b, _, h, d = buf.shape
    cap = scope_capacity(plan, cfg)
    out = torch.empty((b, cap, h, d), dtype=buf.dtype, device=dev)
    local = plan.total - plan.local_start
    sink_src, local_src = buf[:, : plan.sink_len], buf[:, plan.local_start :]
    stream = None
    if dev.type == "cuda" and not buf.is_cuda:
        # mapped cache pages are pageable: a copy from them would stall the host until the GPU caught up
        sink_src, local_src = _pinned(sink_src), _pinned(local_src)
        stream = copy_stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))  # ``out`` was allocated on the compute stream
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out[:, : plan.sink_len].copy_(sink_src, non_blocking=True)
        out[:, cap - local :].copy_(local_src, non_blocking=True)
    return out, stream


def finish_scope(
    buf: torch.Tensor | TokenSegments,
    out: torch.Tensor,
    stream: torch.cuda.Stream | None,
    plan: ScopePlan,
    idx: torch.Tensor,
) -> None:
    """Copy the selected positions ``idx`` ``[B, NS]`` (on ``buf``'s device) of ``buf`` into ``out``
    right after the sink (`start_scope` put the local window in the last rows of ``out``)."""
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


def _gather_row(buf: torch.Tensor | TokenSegments, i: int, idx: torch.Tensor, out: torch.Tensor) -> None:
    """``out[0] = buf[i, idx]``: tokens ``idx`` ``[N]`` of batch row ``i`` into ``out`` ``[1, N, H, D]``."""
    if isinstance(buf, TokenSegments):  # adopted cache pages: read only the parts that hold ``idx``
        buf.row(i).index_select(1, idx, out=out)
    else:
        torch.index_select(buf[i], 0, idx, out=out[0])
