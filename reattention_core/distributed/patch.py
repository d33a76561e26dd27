"""`enable_sharded_reattention`: run a model under ReAttention with a sharded KV store.

It builds on `enable_reattention` (identity RoPE hook, per-module `LayerRuntime`), then switches
the attention implementation to ``"reattention_sharded"``, registered here, which reads this
rank's shard and the global length from a `ShardContext` set on every attention module. On exit
both context managers restore the model exactly. No file of the single-device path changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reattention_core.config import ReAttentionConfig
from reattention_core.distributed.attention import sharded_reattention_attention
from reattention_core.store.sharded import ShardedKVStore
from reattention_core.hf import _compat, enable_reattention
from reattention_core.hf.architectures import attention_modules
from reattention_core.hf.attention_fn import ATTN_IMPLEMENTATION, RUNTIME_ATTR, LayerRuntime
from reattention_kernels import KernelOptions

SHARDED_IMPLEMENTATION = "reattention_sharded"
SHARD_ATTR = "reattention_shard"


@dataclass(frozen=True)
class ShardContext:
    """What one attention layer needs to find its shard: the store, its layer index, the group."""

    store: ShardedKVStore
    layer_idx: int
    group: dist.ProcessGroup | None = None


def sharded_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The contract of ``sdpa_attention_forward``; ``key``/``value`` are this rank's shard."""
    runtime: LayerRuntime | None = getattr(module, RUNTIME_ATTR, None)
    shard: ShardContext | None = getattr(module, SHARD_ATTR, None)
    if runtime is None or shard is None:
        raise RuntimeError("the 'reattention_sharded' attention runs only inside `enable_sharded_reattention`")
    out = sharded_reattention_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        runtime.config,
        runtime.rope,
        query.shape[-1] ** -0.5 if scaling is None else scaling,
        shard_start=shard.store.layout.start,
        total=shard.store.length(shard.layer_idx),
        group=shard.group,
        kernel_options=runtime.kernel_options,
    )
    return out, None


@contextmanager
def enable_sharded_reattention(
    model: torch.nn.Module,
    config: ReAttentionConfig,
    store: ShardedKVStore,
    *,
    group: dist.ProcessGroup | None = None,
    kernel_options: KernelOptions | None = None,
) -> Iterator[LayerRuntime]:
    """Run ``model`` under ReAttention over ``store`` (wrap it in a `ReAttentionCache`).

    Every rank of ``group`` must run the same forward passes in the same order: each attention
    layer runs two collectives.
    """
    with enable_reattention(model, config, kernel_options=kernel_options) as runtime:
        _compat.register_attention(SHARDED_IMPLEMENTATION, sharded_attention_forward)
        modules = attention_modules(model)
        try:
            _compat.set_attn_implementation(model, SHARDED_IMPLEMENTATION)
            for i, module in enumerate(modules):
                setattr(module, SHARD_ATTR, ShardContext(store, i, group))
            yield runtime
        finally:
            for module in modules:
                if hasattr(module, SHARD_ATTR):
                    delattr(module, SHARD_ATTR)
            _compat.set_attn_implementation(model, ATTN_IMPLEMENTATION)
