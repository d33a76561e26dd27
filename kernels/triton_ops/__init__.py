"""Triton kernels, imported lazily by the ops of `reattention_kernels` (each beside its reference)."""

from reattention_kernels.triton_ops.attention import scope_attention_triton
from reattention_kernels.triton_ops.topk import score_topk_triton

__all__ = ["scope_attention_triton", "score_topk_triton"]
