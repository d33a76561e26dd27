"""ReAttention kernels (import name ``reattention_kernels``; the source folder is ``kernels/``).

Public ops (`ops`): `score_topk`, `select_from_hits`, `score_select`, `scope_attention`, `append_kv`,
each a Triton kernel beside its PyTorch reference (`reference`), chosen per call by `KernelOptions`.
Imported as ``kernels`` (a checkout's root on ``sys.path``), this file hands that name to Hugging
Face's kernel-hub package, or to an empty module where none is installed (kernels/README.md says why).
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
            "kernels",
            "Not Hugging Face's kernels (not installed): the folder kernels/ of a reattention checkout "
            "is the package reattention_kernels.",
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
    from reattention_kernels.options import KernelOptions
    from reattention_kernels.reference import append_kv_ref, scope_attention_ref, score_topk_ref, select_from_hits_ref

    __all__ = [
        "KernelOptions",
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
