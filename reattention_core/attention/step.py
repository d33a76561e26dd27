"""`LayerStep`: what one attention call needs besides the queries and the layer's keys and values.

The Hugging Face glue builds one per layer call from the model's settings (`enable_reattention`)
and the step context the `ReAttentionCache` carries (the store, a CUDA-graph step's shift, an
observer), and hands it down to the store and the kernels; nothing is read from module state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from reattention_core.attention.rope import RopeSpec
from reattention_core.attention.scope import ScopePlan
from reattention_core.config import ReAttentionConfig
from reattention_kernels import KernelOptions


@dataclass(frozen=True)
class SelectionEvent:
    """One layer step's selection, as an observer sees it.

    Attributes:
        layer: the layer index.
        plan: the step's scope plan.
        queries: the voting query rows ``[B, TQ, HQ, D]`` (pre-RoPE).
        hits: int64 ``[B, TQ, HQ, top_k]`` top-k middle positions (relative to the middle's start, ``-1``: none).
        sel, n_sel: the selected store positions ``[B, NS]`` (ascending) and their counts ``[B]``.
        middle_keys: the middle's keys ``[B, M, H, D]`` the hits index (``None`` where the store keeps
            them elsewhere than on the queries' device, or split across ranks).
    """

    layer: int
    plan: ScopePlan
    queries: torch.Tensor
    hits: torch.Tensor
    sel: torch.Tensor
    n_sel: torch.Tensor
    middle_keys: torch.Tensor | None


class SelectionObserver(Protocol):
    """Called with every selecting layer step of a run (`ReAttentionEngine.start(..., observer=...)`).

    An observed run selects through the two separate ops (top-k, then blocks) to report the hits;
    they give the fused op's result, and CUDA graphs are not used.
    """

    def __call__(self, event: SelectionEvent) -> None: ...


@dataclass(frozen=True)
class LayerStep:
    """One attention call's settings and step context.

    Attributes:
        config: sizes and mode.
        rope: the model's rotary settings.
        scale: softmax scale.
        kernel_options: the kernels' settings (backend, optional paths).
        shift: for a CUDA-graph step, an int64 ``[1]`` device tensor of the tokens stored since the
            step was recorded (``None`` otherwise; `reattention_core.generation.cuda_graph`).
        layer: the layer index.
        observer: called with the step's selection (``None``: not observed).
    """

    config: ReAttentionConfig
    rope: RopeSpec
    scale: float
    kernel_options: KernelOptions = KernelOptions()
    shift: torch.Tensor | None = None
    layer: int = 0
    observer: SelectionObserver | None = None
