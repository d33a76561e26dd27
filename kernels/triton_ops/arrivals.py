"""Arrival counts: the last program of a group to finish runs the group's epilogue in the same launch.

Each program adds one to its group's int32 count after its stores (a barrier, then one acq_rel atomic
at GPU scope); the one that takes the last count combines the partial results (loads through the L2)
and zeroes the count for the next launch (kernels/README.md, "Epilogues"). The counts are kept per
device and never freed: a recorded CUDA graph holds their addresses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per (device type, index): count tensors, the latest the largest.
_COUNTS: dict[tuple[str, int | None], list[torch.Tensor]] = {}


def arrival_counts(device: torch.device, n: int) -> torch.Tensor | None:
    """At least ``n`` zeroed int32 counts on ``device``, or None while a CUDA graph is being captured
    and none that large exists yet (a count made there would be zeroed only when the graph replays)."""
    kept = _COUNTS.setdefault((device.type, device.index), [])
    if kept and kept[-1].numel() >= n:
        return kept[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    kept.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return kept[-1]


def counts_are_zero() -> bool:
    """Whether every count is back at zero (what each launch must leave; tests)."""
    return all(int(c.abs().sum()) == 0 for kept in _COUNTS.values() for c in kept)


@triton.jit
def last_arrival(counts, i, total):
    """Count this program's arrival in group ``i`` of ``total`` programs, after its stores; True in the
    last one to arrive, which also puts the group's count back to zero."""
    # every thread's stores are issued before the count is released (acq_rel, GPU scope)
    tl.debug_barrier()
    done = tl.atomic_add(counts + i, 1, sem="acq_rel", scope="gpu")
    last = done == total - 1
    if last:
        tl.atomic_xchg(counts + i, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    return last


__all__ = ["arrival_counts", "counts_are_zero", "last_arrival"]
