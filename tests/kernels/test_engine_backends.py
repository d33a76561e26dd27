"""End to end: the engine on the Triton kernels produces the same tokens as on the references."""

from __future__ import annotations

import pytest
import torch

from reattention_core import ReAttentionConfig, ReAttentionEngine
from reattention_kernels import KernelOptions
from tests.helpers import ByteTokenizer, tiny_model

CFG = ReAttentionConfig(sink_size=4, block_size=8, top_k=2, max_blocks=3, local_window=24, prefill_chunk_size=16)


@pytest.mark.parametrize(
    ("arch", "fuse"), [("llama", False), ("qwen3", False), pytest.param("llama", True, id="llama-decode-epilogues")]
)
def test_triton_and_reference_backends_agree_on_tokens(arch, fuse, monkeypatch):
    """``fuse``: decode steps select in the scoring kernel's last program and merge the split scope
    attention in its last program (`KernelOptions.fuse_decode_selection`, ``fuse_decode_merge``)."""
    from reattention_kernels.triton_ops import attention
    from reattention_kernels.triton_ops.topk import plan

    options = KernelOptions(fuse_decode_selection=fuse, fuse_decode_merge=fuse)
    taken, merged = [], []
    real, counts = plan.fused_selection, attention.arrival_counts
    monkeypatch.setattr(plan, "fused_selection", lambda *a: (got := real(*a), taken.append(got is not None))[0])
    monkeypatch.setattr(attention, "arrival_counts", lambda *a: (got := counts(*a), merged.append(got is not None))[0])
    model = tiny_model(arch, hidden_size=128, head_dim=32)  # the kernels need head dim >= 32
    if torch.cuda.is_available():
        model = model.cuda()
    prompt = "the quick brown fox jumps over the lazy dog; " * 3
    results = {}
    for backend in ("reference", "triton"):
        engine = ReAttentionEngine(model, ByteTokenizer(), CFG, backend=backend, kernel_options=options)
        results[backend] = engine.generate(prompt, max_new_tokens=6).token_ids
    assert len(results["reference"]) == 6
    assert results["triton"] == results["reference"]
    assert any(taken) == any(merged) == fuse  # the decode steps took the paths asked for
