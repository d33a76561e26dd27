"""`enable_reattention`: run a Hugging Face model under ReAttention, reversibly.

The model's code is not edited: hooks and its attention implementation route each attention layer to
ReAttention; on exit everything is restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from reattention_core.attention.rope import RopeSpec
from reattention_core.config import ReAttentionConfig
from reattention_core.hf import _compat
from reattention_core.hf.architectures import attention_modules, check_model, rotary_module
from reattention_core.hf.attention_fn import (
    ATTN_IMPLEMENTATION,
    CACHE_KWARG,
    RUNTIME_ATTR,
    LayerRuntime,
    reattention_attention_forward,
)
from reattention_kernels import KernelOptions
from reattention_kernels.options import with_backend


def _identity_rope(
    module: torch.nn.Module, args: object, output: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = output
    return torch.ones_like(cos), torch.zeros_like(sin)


def _hand_on_cache(
    module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[tuple[object, ...], dict[str, object]]:
    """Give the attention function the cache the layer received (keyword arguments reach it unchanged)."""
    return args, {**kwargs, CACHE_KWARG: _compat.layer_cache(kwargs)}


def model_rope(model: torch.nn.Module, config: ReAttentionConfig) -> RopeSpec:
    """The RoPE that ``config`` runs ``model`` with: its own, or YaRN-scaled by ``config.yarn_factor``."""
    rotary = rotary_module(model)
    if config.yarn_factor is not None:
        rotary = _compat.yarn_rotary(model, rotary, config.yarn_factor)
    return RopeSpec.from_rotary(rotary)


@contextmanager
def enable_reattention(
    model: torch.nn.Module,
    config: ReAttentionConfig,
    *,
    backend: str | None = None,
    kernel_options: KernelOptions | None = None,
) -> Iterator[LayerRuntime]:
    """Run ``model`` under ReAttention inside a ``with`` block (use a `ReAttentionCache`).

    A hook on the rotary module makes ``(cos, sin)`` ``(1, 0)``, so the layers leave queries and keys
    un-rotated (exactly) and ReAttention applies RoPE at scope positions; the attention implementation
    becomes the registered ``"reattention"`` function; a pre-hook on each attention module passes the
    layer's `ReAttentionCache` on to it (``reattention_cache``). On exit hooks, attributes and the
    previous implementation are restored, so the model is exactly what it was.

    Args:
        model: a supported ``*ForCausalLM`` (Llama, Mistral, Qwen2, Qwen3).
        config: ReAttention settings.
        backend: kernel backend override (``"triton"``, ``"reference"`` or ``None`` for auto).
        kernel_options: the kernels' settings (`reattention_kernels.KernelOptions`; ``backend`` sets
            its backend).

    Yields:
        The `LayerRuntime` shared by all attention layers.
    """
    _compat.check_transformers()
    check_model(model)
    rotary = rotary_module(model)
    device = next(model.parameters()).device
    options = with_backend(kernel_options, backend)
    runtime = LayerRuntime(config=config, rope=model_rope(model, config).to(device), kernel_options=options)
    if _compat.registered_attention(ATTN_IMPLEMENTATION) is None:  # compiled layers swap in their own
        _compat.register_attention(ATTN_IMPLEMENTATION, reattention_attention_forward)
    previous = _compat.get_attn_implementation(model)
    modules = attention_modules(model)
    handles = [rotary.register_forward_hook(_identity_rope)]
    try:
        _compat.set_attn_implementation(model, ATTN_IMPLEMENTATION)
        for module in modules:
            setattr(module, RUNTIME_ATTR, runtime)
            handles.append(module.register_forward_pre_hook(_hand_on_cache, with_kwargs=True))
        yield runtime
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            if hasattr(module, RUNTIME_ATTR):
                delattr(module, RUNTIME_ATTR)
        if previous is not None and _compat.get_attn_implementation(model) != previous:
            _compat.set_attn_implementation(model, previous)
