"""The GQA row layout every kernel here shares: a program's rows ``r = t * G + g`` of one KV head.

Query token ``t`` and query head ``i_h * G + g`` of a KV head's group become one row, so a key tile
loaded once serves the whole group.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_heads(o_r, i_h, G: tl.constexpr):
    """Token (int64) and query head of rows ``o_r`` of KV head ``i_h``'s group: row ``r = t * G + g``."""
    return (o_r // G).to(tl.int64), i_h * G + (o_r % G)


@triton.jit
def group_rows(i_m, i_h, R, BM: tl.constexpr, G: tl.constexpr):
    """Program ``i_m``'s ``BM`` rows of KV head ``i_h``: ``(r, r < R, token, query head)``, each ``[BM]``."""
    o_r = i_m * BM + tl.arange(0, BM)
    o_t, o_hq = row_heads(o_r, i_h, G)
    return o_r, o_r < R, o_t, o_hq


__all__ = ["group_rows", "row_heads"]
