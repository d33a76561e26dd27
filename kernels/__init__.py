"""ReAttention kernels (import name ``reattention_kernels``; the source folder is ``kernels/``).

Public ops (`reattention_kernels.ops`), each dispatched (see `dispatch`) to a Triton kernel or its PyTorch
reference:

* `score_topk` - exact per-row, per-head top-k of raw ``q . k`` over the middle of the store.
* `select_from_hits` - votes, clip to ``max_blocks`` and widening to blocks, from the top-k hits.
* `score_select` - both (one kernel for a decode step where it fits, with ``FUSE_DECODE_SELECTION``).
* `scope_attention` - attention over ``[sink | selected | local]`` read by index from the pre-RoPE
  store, RoPE applied at fresh contiguous positions, bottom-right causal.
* `append_kv` - a step's keys and values written into the store's buffers at a (shifted) length.

The folder is deliberately not importable as ``kernels``: that name belongs to Hugging Face's
kernel-hub package, which transformers requires (from 5.25) and imports. An installed reattention maps
the folder to ``reattention_kernels``; in a checkout whose root is on ``sys.path`` (``python -m pytest``,
a script run from the root) Python would still find the folder as ``kernels``, so this file then hands
that name to the hub package or, where none is installed, to an empty module with no file and no version:
what transformers takes for a stray namespace folder, not an installed package (it imports whatever
``find_spec("kernels")`` finds to read a version, and an import error there would break ``import
transformers``).
"""

from __future__ import annotations

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    # the import system returns what sys.modules holds for the name once this file has run
    if _spec is None or _spec.loader is None:
        sys.modules["kernels"] = types.ModuleType(
            "kernels", "Not Hugging Face's kernels (not installed): the folder kernels/ of a reattention checkout "
            "is the package reattention_kernels."
        )
    else:
        _hub = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _hub
        _spec.loader.exec_module(_hub)
else:
    from reattention_kernels.dispatch import resolve_backend
    from reattention_kernels.ops import (
        append_kv,
        scope_attention,
        score_select,
        score_topk,
        select_from_hits,
        shifted_steps_supported,
    )
    from reattention_kernels.reference import append_kv_ref, scope_attention_ref, score_topk_ref, select_from_hits_ref

    __all__ = [
        "append_kv",
        "append_kv_ref",
        "resolve_backend",
        "scope_attention",
        "scope_attention_ref",
        "score_select",
        "score_topk",
        "score_topk_ref",
        "select_from_hits",
        "select_from_hits_ref",
        "shifted_steps_supported",
    ]
