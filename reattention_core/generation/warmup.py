"""The synthetic prompt a warm-up runs, so that a server's first real question pays no compile time.

The first selection and attention calls of a process compile or load their GPU kernels (a second
or so per kernel variant). The prompt is long enough to exercise a full prefill chunk with
selection, a partial one, the last token alone and a few decode steps; where CUDA graphs apply, long
enough to record a prefill graph and a decode graph as well.
"""

from __future__ import annotations

from reattention_core.config import ReAttentionConfig
from reattention_core.generation.cuda_graph import MIN_STEPS


def warmup_ids(config: ReAttentionConfig, vocab_size: int, *, graphs: bool) -> list[int]:
    """Token ids ``1 .. vocab_size - 1`` repeated over the warm-up prompt's length (see the module doc)."""
    chunk = config.prefill_chunk_size
    n = config.sink_size + config.local_window + chunk + chunk // 2 + 2
    if graphs:  # enough full chunks past sink + local window to record a prefill graph
        n = config.sink_size + max(config.local_window, chunk) + (MIN_STEPS + 1) * chunk + chunk // 2 + 2
    return [i % (vocab_size - 1) + 1 for i in range(n)]


def warmup_decode_steps(decode_steps: int, *, graphs: bool) -> int:
    """Decode steps to run: ``decode_steps``, or enough to record a decode graph where graphs apply."""
    return max(decode_steps, MIN_STEPS + 1) if graphs else decode_steps
