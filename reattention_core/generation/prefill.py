"""Chunked prefill: feed a prompt through the model ``prefill_chunk_size`` tokens at a time.

Each chunk runs one selection per layer (all of its queries vote), so prefill memory and the attention
scope stay bounded however long the prompt is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from reattention_core.hf import ReAttentionCache
from reattention_core.hf._compat import cache_argument

if TYPE_CHECKING:
    from reattention_core.generation.cuda_graph import StepGraph

# Below this many chunks a progress bar is noise.
_PROGRESS_MIN_CHUNKS = 8


def plan_prefill(
    num_tokens: int, chunk_size: int, *, last_alone: bool = True, breaks: Sequence[int] = ()
) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of the prefill chunks of a ``num_tokens`` prompt.

    Chunks of ``chunk_size`` cover all but the last token, which gets a range of its own
    (``last_alone=False``: plain chunks to the end, for warming a cache without answering).
    ``breaks``: offsets where a chunk must end and the grid restarts (a corpus boundary: the
    tokens before it then never share a chunk, hence a selection, with the question after it).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_tokens < 1:
        return []
    head = num_tokens if not last_alone else num_tokens - 1
    edges = sorted({0, head, *(b for b in breaks if 0 < b < head)})
    spans = zip(edges, edges[1:], strict=False)
    plan = [(s, min(s + chunk_size, stop)) for lo, stop in spans for s in range(lo, stop, chunk_size)]
    return plan + ([(head, num_tokens)] if last_alone else [])


@torch.inference_mode()
def run_prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: ReAttentionCache,
    chunk_size: int,
    *,
    start: int = 0,
    last_alone: bool = True,
    progress: bool | None = None,
    desc: str = "prefill",
    on_chunk: Callable[[int], None] | None = None,
    breaks: Sequence[int] = (),
    graph: StepGraph | None = None,
) -> torch.Tensor | None:
    """Run ``input_ids [1, N]`` through ``model`` chunk by chunk, appending to ``cache``.

    Args:
        start: tokens ``[0, start)`` are already in ``cache`` (restored from the prefix cache);
            prefill resumes there. It must be a chunk boundary of the full schedule, so that
            every token sees exactly the chunks it would have seen in a cold run (a token's keys
            and values depend on the chunk schedule: one selection per chunk).
        last_alone: run the last token alone, like a decode step, so the query that predicts the first
            answer token selects its own scope (as the paper's driver does); ``False`` for cache warm-up.
        progress: show a tqdm bar (``None``: only for prompts of 8 chunks or more).
        on_chunk: called with the end offset after each chunk has been appended to ``cache``.
        breaks: chunk-grid restarts (see `plan_prefill`); a cache warmed up to a break and a
            later prompt resuming there must use the same breaks.
        graph: a `reattention_core.generation.cuda_graph.StepGraph` over ``cache`` with steps of
            ``chunk_size`` tokens: full-size chunks are replayed from it (the others run eagerly).

    Returns:
        torch.Tensor: fp32 logits ``[1, V]`` of the last prompt token (``None`` only when
        ``last_alone=False`` and nothing was left to run).
    """
    n = input_ids.shape[1]
    plan = plan_prefill(n, chunk_size, last_alone=last_alone, breaks=breaks)
    if start:
        starts = {s for s, _ in plan}
        if start not in starts and not (start == n and not last_alone):
            raise ValueError(
                f"start={start} is not a prefill chunk boundary of a {n}-token prompt with chunks of {chunk_size}"
            )
        held = cache.get_seq_length()
        if held != start:
            raise ValueError(f"the cache holds {held} tokens but prefill was asked to resume at {start}")
    chunks = [(s, e) for s, e in plan if s >= start]
    show = len(chunks) >= _PROGRESS_MIN_CHUNKS if progress is None else progress
    logits = None
    kw = cache_argument(model, cache)
    with tqdm(total=n, initial=start, desc=desc, unit="tok", disable=not show, leave=False) as bar:
        for s, e in chunks:
            if graph is not None:
                logits = graph.step(input_ids[:, s:e])
            else:
                out = model(input_ids=input_ids[:, s:e], **kw, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1]
            if on_chunk is not None:
                on_chunk(e)
            bar.update(e - s)
    if logits is None:
        assert not last_alone, "empty prompt"
        return None
    return logits.float()
