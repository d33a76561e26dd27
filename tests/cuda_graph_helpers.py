"""Prefill and decode a tiny model three ways (eager steps, emulated replays, recorded CUDA graphs)
for the step-graph tests in `tests/generation/test_cuda_graph.py` and `tests/kernels/test_cuda_graph_kernels.py`."""

from __future__ import annotations

import torch

from reattention_core import ReAttentionCache, ReAttentionConfig, enable_reattention
from reattention_core.generation.cuda_graph import StepGraph
from reattention_core.generation.prefill import run_prefill
from reattention_core.store import ResidentStore

CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=3, local_window=12, prefill_chunk_size=8)


def decode(model, ids: torch.Tensor, steps: int, how: str, *, backend: str, cfg: ReAttentionConfig = CFG):
    """Prefill ``ids [1, N]``, then greedy-decode ``steps`` tokens.

    Returns:
        ``(tokens, logits [steps, V], store, decode replays, prefill replays)``: ``how`` is
        ``"eager"``, ``"emulated"`` (`StepGraph(record=False)`) or ``"graph"`` (recorded; CUDA only).
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    max_length = ids.shape[1] + steps
    record = how == "graph"
    with torch.inference_mode(), enable_reattention(model, cfg, backend=backend):
        store = ResidentStore(model.config.num_hidden_layers)
        store.reserve(max_length)
        cache = ReAttentionCache(store)
        chunks = None
        if how != "eager":
            chunks = StepGraph(model, cache, cfg, max_length, tokens=cfg.prefill_chunk_size, record=record)
        logits = run_prefill(model, ids, cache, cfg.prefill_chunk_size, graph=chunks)
        graph = None if how == "eager" else StepGraph(model, cache, cfg, max_length, record=record)
        tokens, rows = [], []
        for _ in range(steps):
            token = int(logits[0].argmax())
            tokens.append(token)
            if graph is None:
                out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1].float()
            else:
                logits = graph.step_token(token)
            rows.append(logits[0].clone())
    return (
        tokens,
        torch.stack(rows),
        store,
        0 if graph is None else graph.replays,
        0 if chunks is None else chunks.replays,
    )


def assert_same_store(a: ResidentStore, b: ResidentStore, **tol) -> None:
    assert a.min_length() == b.min_length() and a.length(0) == b.length(0)
    for layer in range(a.num_layers):
        for x, y in zip(a.view(layer), b.view(layer), strict=True):
            torch.testing.assert_close(x, y, **tol)
