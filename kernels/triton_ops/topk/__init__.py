"""Exact fused ``q . k`` scoring with a per-row top-k (the position-agnostic first attention).

`scan` (one pass, or phase 1 of two), `merge` (the split merge), `rescore` (phase 2), `plan`
(block shapes, splits, phases), `forward` (the host wrappers); the design: kernels/README.md.
"""

from reattention_kernels.triton_ops.topk.forward import score_select_triton, score_topk_fwd, score_topk_triton
from reattention_kernels.triton_ops.topk.plan import TopkTuning

__all__ = ["TopkTuning", "score_select_triton", "score_topk_fwd", "score_topk_triton"]
