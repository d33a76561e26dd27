"""The attention function registered with transformers under the name ``"reattention"``.

It has the contract of ``sdpa_attention_forward``: it receives ``[B, H, T, D]`` tensors and
returns ``([B, TQ, HQ, D], None)``. The model's settings come from ``module.reattention_runtime``
and the step's context from the `ReAttentionCache` the layer was given, which `enable_reattention`
passes on as the keyword argument ``reattention_cache``; the function itself holds no state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from reattention_core.attention import LayerStep, reattention_attention
from reattention_core.attention.rope import RopeSpec
from reattention_core.config import ReAttentionConfig
from reattention_core.hf.architectures import layer_index
from reattention_core.hf.cache import ReAttentionCache
from reattention_kernels import KernelOptions

ATTN_IMPLEMENTATION = "reattention"
RUNTIME_ATTR = "reattention_runtime"
CACHE_KWARG = "reattention_cache"


@dataclass(frozen=True)
class LayerRuntime:
    """What the attention function needs from the model's side besides tensors."""

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
    cache = kwargs.get(CACHE_KWARG)
    if not isinstance(cache, ReAttentionCache):
        raise RuntimeError(
            "under `enable_reattention` the model needs a ReAttentionCache: model(..., past_key_values="
            "ReAttentionCache(ResidentStore(num_layers)), use_cache=True)"
        )
    context = cache.step
    layer = layer_index(module)
    step = LayerStep(
        config=runtime.config,
        rope=runtime.rope,
        scale=query.shape[-1] ** -0.5 if scaling is None else scaling,
        kernel_options=runtime.kernel_options,
        shift=context.shift,
        layer=layer,
        observer=context.observer,
    )
    kv = context.store.layer(layer, shift=context.shift)
    return reattention_attention(query.transpose(1, 2), kv, step), None


@functools.cache
def compiled_forward() -> Callable[..., tuple[torch.Tensor, None]]:
    """`reattention_attention_forward` wrapped in ``torch.compiler.disable``, for compiled decoder
    layers (`hf.compiled`): they call it as it is, a graph break. Made on first use, not at import
    (``torch.compiler.disable`` imports ``torch._dynamo``)."""
    return torch.compiler.disable(reattention_attention_forward)
