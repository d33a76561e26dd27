"""The attention function registered with transformers under the name ``"reattention"``.

It has the contract of ``sdpa_attention_forward``: it receives ``[B, H, T, D]`` tensors and
returns ``([B, TQ, HQ, D], None)``. Its settings come from ``module.reattention_runtime``, which
`enable_reattention` sets on every attention module and removes on exit, so the function itself
holds no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reattention_core.generation import cuda_graph
from reattention_core.store import offloaded as offload
from reattention_core.attention.layer import reattention_attention
from reattention_core.config import ReAttentionConfig
from reattention_core.attention.rope import RopeSpec
from reattention_kernels import KernelOptions

ATTN_IMPLEMENTATION = "reattention"
RUNTIME_ATTR = "reattention_runtime"


@dataclass(frozen=True)
class LayerRuntime:
    """What the attention function needs besides tensors."""

    config: ReAttentionConfig
    rope: RopeSpec
    kernel_options: KernelOptions = KernelOptions()


def reattention_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    runtime: LayerRuntime | None = getattr(module, RUNTIME_ATTR, None)
    if runtime is None:
        raise RuntimeError(
            "the 'reattention' attention implementation runs only inside `enable_reattention(model, config)`"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    handed = offload.take()
    if handed is not None:  # the store is in host memory: select and gather the scope from there
        store, layer = handed
        out = offload.offloaded_attention(
            query.transpose(1, 2), store, layer, runtime.config, runtime.rope, scaling,
            kernel_options=runtime.kernel_options,
        )  # fmt: skip
        return out, None
    step = cuda_graph.current()
    out = reattention_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        runtime.config,
        runtime.rope,
        scaling,
        kernel_options=runtime.kernel_options,
        total=None if step is None else step.total,
        shift=None if step is None else step.shift,
    )
    return out, None


_registered = reattention_attention_forward


def registered_forward():
    """The function `enable_reattention` registers: `reattention_attention_forward`, wrapped in
    ``torch.compiler.disable`` once compiled layers have been used (`keep_out_of_graphs`)."""
    return _registered


def keep_out_of_graphs() -> None:
    """Make compiled decoder layers (`hf.compiled`) call the attention function as it is: a graph
    break. Done on first use, not at import (``torch.compiler.disable`` imports ``torch._dynamo``)."""
    global _registered
    if _registered is reattention_attention_forward:
        _registered = torch.compiler.disable(reattention_attention_forward)
