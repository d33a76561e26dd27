"""Which Hugging Face architectures run under ReAttention, and where their parts live.

Every supported family computes RoPE once per forward in ``model.model.rotary_emb`` and passes
``(cos, sin)`` to each attention layer, which applies it right before ``past_key_values.update``
and the registered attention function: that is the seam ReAttention uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch

from reattention_core.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its rotary module and attention layers."""

    model_type: str
    notes: str = ""


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral", "a configured sliding window is superseded by the ReAttention scope"),
    "qwen2": ArchSpec("qwen2", "a configured sliding window is superseded by the ReAttention scope"),
    "qwen3": ArchSpec("qwen3", "q_norm/k_norm run before RoPE, so stored keys are normalised and pre-RoPE"),
}


def supported_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def check_model_type(model_type: str | None) -> ArchSpec:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported by ReAttention; supported model types: {supported_list()}"
        )
    return ARCHITECTURES[model_type]


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``model.model`` for a *ForCausalLM, the model itself otherwise)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "layers") else model


def check_model(model: torch.nn.Module) -> ArchSpec:
    config = getattr(model, "config", None)
    spec = check_model_type(getattr(config, "model_type", None))
    body = backbone(model)
    if not hasattr(body, "rotary_emb") or not hasattr(body, "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `rotary_emb`/`layers` where a {spec.model_type} model keeps them"
        )
    return spec


def model_config(model: torch.nn.Module) -> Any:
    """The model's transformers config (``model.config``)."""
    return cast(Any, model).config


def _part(model: torch.nn.Module, name: str) -> Any:
    return getattr(backbone(model), name)


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    return _part(model, "rotary_emb")


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in _part(model, "layers")]


def layer_index(attention: torch.nn.Module) -> int:
    """The index of an attention module's layer (what it passes to ``cache.update``)."""
    return int(vars(attention)["layer_idx"])


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(_part(model, "layers"))


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    return _part(model, "norm")


def kv_shape(config: Any) -> tuple[int, int]:
    """``(KV heads, head dim)`` of a model config: the shape of each token's keys and values."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)


def pretraining_window(config: object) -> int:
    """Positions the model was trained on (the range ReAttention keeps positions inside)."""
    window = getattr(config, "max_position_embeddings", None)
    if not isinstance(window, int) or window <= 0:
        raise UnsupportedModelError("the model config has no valid max_position_embeddings")
    return window
