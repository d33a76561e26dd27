"""One layer of ReAttention: the scope plan, block selection, RoPE and the attention function.

* `layer` - `reattention_attention` and the `LayerKV` seam a store implements;
* `scope` - `plan_scope` (sink, middle, local window) and `Selection`;
* `selection` - top-k hits, votes and blocks; `rope` - the model's RoPE; `step` - `LayerStep`.
"""

from reattention_core.attention.layer import LayerKV, attend_scope, reattention_attention
from reattention_core.attention.rope import RopeSpec
from reattention_core.attention.scope import ScopePlan, Selection, no_selection, plan_scope, shiftable
from reattention_core.attention.step import LayerStep, SelectionEvent, SelectionObserver

__all__ = [
    "LayerKV",
    "LayerStep",
    "RopeSpec",
    "ScopePlan",
    "Selection",
    "SelectionEvent",
    "SelectionObserver",
    "attend_scope",
    "no_selection",
    "plan_scope",
    "reattention_attention",
    "shiftable",
]
