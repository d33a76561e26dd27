"""Chunked prefill: feed a prompt through the model ``prefill_chunk_size`` tokens at a time.

Each chunk runs one selection per layer (all of its queries vote), so prefill memory and the
attention scope stay bounded however long the prompt is.

The last prompt token always runs alone, like a decode step: the query that predicts the first
answer token then selects its scope by itself instead of sharing one selection with the rest of
its chunk, whose votes would mostly go to whatever that chunk is about (the paper's driver does
the same). Measured on the embedded model: a pass key at 5% depth of 12K tokens was missed with
the last token inside the final chunk and found with it alone.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

# Below this many chunks a progress bar is noise.
_PROGRESS_MIN_CHUNKS = 8


def plan_prefill(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of the prefill chunks of a ``num_tokens`` prompt.

    Chunks of ``chunk_size`` cover all but the last token, which gets a range of its own.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_tokens < 1:
        return []
    head = num_tokens - 1
    return [(s, min(s + chunk_size, head)) for s in range(0, head, chunk_size)] + [(head, num_tokens)]


@torch.inference_mode()
def run_prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: object,
    chunk_size: int,
    *,
    progress: bool | None = None,
    desc: str = "prefill",
) -> torch.Tensor:
    """Run ``input_ids [1, N]`` through ``model`` chunk by chunk, appending to ``cache``.

    Args:
        progress: show a tqdm bar (``None``: only for prompts of 8 chunks or more).

    Returns:
        torch.Tensor: fp32 logits ``[1, V]`` of the last prompt token.
    """
    chunks = plan_prefill(input_ids.shape[1], chunk_size)
    show = len(chunks) >= _PROGRESS_MIN_CHUNKS if progress is None else progress
    logits = None
    with tqdm(total=input_ids.shape[1], desc=desc, unit="tok", disable=not show, leave=False) as bar:
        for start, end in chunks:
            out = model(input_ids=input_ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
            bar.update(end - start)
    assert logits is not None, "empty prompt"
    return logits.float()
