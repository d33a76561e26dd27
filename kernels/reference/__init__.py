"""Pure-PyTorch references: the specification every Triton kernel is tested against."""

from reattention_kernels.reference.attention import apply_rope_ref, rope_cos_sin, scope_attention_ref
from reattention_kernels.reference.select import expand_blocks, select_from_hits_ref, vote_and_clip
from reattention_kernels.reference.store import append_kv_ref
from reattention_kernels.reference.topk import score_topk_ref

__all__ = [
    "append_kv_ref",
    "apply_rope_ref",
    "expand_blocks",
    "rope_cos_sin",
    "scope_attention_ref",
    "score_topk_ref",
    "select_from_hits_ref",
    "vote_and_clip",
]
