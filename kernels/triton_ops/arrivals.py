"""Arrival counts: the last program of a group to finish runs the group's epilogue in the same launch.

A split kernel (decode scoring over key splits, decode attention over scope splits) writes partial
results that a second kernel used to combine. Instead, each program of a group adds one to the
group's count after its stores; the program that takes the last count sees every partial result and
combines them, then puts the count back to zero for the next launch. One launch fewer per op and
layer step, and no wait between the two kernels.

Memory order: the program's threads finish their stores, meet at a barrier, then one thread adds with
acquire-release semantics at GPU scope (Triton issues a scalar atomic from one thread and broadcasts
its result through shared memory after another barrier). The release covers the stores the barrier
ordered before it, and the acquire of the last program covers every earlier release in the count's
modification order, so its loads (through the L2: ``.cg``) see all partial results.

The counts are int32 tensors kept per device and never freed: a recorded CUDA graph holds their
addresses. Launches on one stream run one after another and leave every count at zero, so all
kernels share them; two launches on different streams at once would not (the engine uses one).
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
