"""`enable_reattention`: run a Hugging Face model under ReAttention, reversibly.

Inside the context manager:

* a forward hook on the model's rotary module replaces its ``(cos, sin)`` by ``(1, 0)``, so the
  unmodified attention layers leave queries and keys un-rotated (``q * 1 + rotate_half(q) * 0 == q``
  exactly); ReAttention re-applies RoPE itself at scope positions;
* the model's attention implementation is switched to the registered ``"reattention"`` function,
  which reads its settings from an attribute set on each attention module.

On exit the hook, the attributes and the previous attention implementation are restored, so the
model is exactly what it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from reattention_core.config import ReAttentionConfig
from reattention_core.hf import _compat
from reattention_core.hf.architectures import attention_modules, check_model, rotary_module
from reattention_core.hf.attention_fn import (
    ATTN_IMPLEMENTATION,
    RUNTIME_ATTR,
    LayerRuntime,
    registered_forward,
)
from reattention_core.attention.rope import RopeSpec
from reattention_kernels import KernelOptions
from reattention_kernels.options import with_backend


def _identity_rope(module: torch.nn.Module, args: object, output: tuple[torch.Tensor, torch.Tensor]):
    cos, sin = output
    return torch.ones_like(cos), torch.zeros_like(sin)


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
    _compat.register_attention(ATTN_IMPLEMENTATION, registered_forward())
    previous = _compat.get_attn_implementation(model)
    modules = attention_modules(model)
    handle = rotary.register_forward_hook(_identity_rope)
    try:
        _compat.set_attn_implementation(model, ATTN_IMPLEMENTATION)
        for module in modules:
            setattr(module, RUNTIME_ATTR, runtime)
        yield runtime
    finally:
        handle.remove()
        for module in modules:
            if hasattr(module, RUNTIME_ATTR):
                delattr(module, RUNTIME_ATTR)
        if previous is not None and _compat.get_attn_implementation(model) != previous:
            _compat.set_attn_implementation(model, previous)
