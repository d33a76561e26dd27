"""Every place that depends on the transformers version lives here, and only here.

Supported: transformers 5.x (tested on 5.17 and 5.23-5.25). The extension points used are public:
`AttentionInterface.register`, `PreTrainedModel.set_attn_implementation`, `Cache` built from a list
of `CacheLayerMixin` layers, and forward hooks. The one torch setting that has no public switch
(`dynamo_layer_settings`) lives here too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, cast

import torch
import transformers
from packaging.version import Version

from reattention_core.errors import UnsupportedModelError

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.0")


def check_transformers() -> None:
    if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:
        raise UnsupportedModelError(
            f"transformers {transformers.__version__} is too old; reattention needs >= {MIN_TRANSFORMERS} "
            "(pip install -U 'transformers>=5,<6')"
        )


def register_attention(name: str, fn: Callable) -> None:
    """Register ``fn`` under ``name`` in the global attention registry (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)


def registered_attention(name: str) -> Callable | None:
    """The function registered under ``name`` in the global attention registry, if any."""
    from transformers import AttentionInterface

    return AttentionInterface().get(name)


def get_attn_implementation(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    cast(Any, model).set_attn_implementation(name)


def cache_base_init(cache: object, layers: list) -> None:
    """Initialise a `transformers.Cache` subclass instance with pre-built ``layers``."""
    from transformers.cache_utils import Cache

    Cache.__init__(cache, layers=layers)  # type: ignore[arg-type]


def cache_classes() -> tuple[Any, Any]:
    """``(Cache, CacheLayerMixin)`` base classes (typed ``Any``: subclassed by `hf.cache`)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


@functools.cache
def _cache_argument(forward: Callable[..., Any]) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def layer_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a decoder layer hands its attention module, from the module's keyword arguments: ``cache=``
    (transformers 5.24 and later) or ``past_key_values=``."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def cache_argument(model: torch.nn.Module, cache: object) -> dict[str, Any]:
    """The keyword argument that hands ``cache`` to ``model``'s forward: ``cache=`` where the forward takes it
    (transformers 5.24 and later, where ``past_key_values=`` is deprecated, to be removed in 5.40), else
    ``past_key_values=``."""
    return {_cache_argument(type(model).forward): cache}


def dynamo_layer_settings() -> AbstractContextManager:
    """Dynamo settings while decoder layers are compiled (`reattention_core.hf.compiled`).

    Each attention module's integer ``layer_idx`` would otherwise specialise one graph per layer (30
    compilations for the embedded model, past the default recompile limit); left unspecialised, one
    graph serves every layer. ``torch._dynamo.config.patch`` is the only way to set this per block
    (torch 2.11 and 2.13); it restores the previous value on exit.
    """
    import torch._dynamo

    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)


def yarn_rotary(model: torch.nn.Module, rotary: torch.nn.Module, factor: float) -> torch.nn.Module:
    """A new rotary module of ``rotary``'s class for ``model``'s config with YaRN scaling by ``factor``.

    The config copy says what Qwen's model cards advise adding to config.json (``rope_type="yarn"``,
    ``factor``, ``original_max_position_embeddings`` = the pre-training window), and also raises
    ``max_position_embeddings`` to the stretched window: transformers versions that derive the factor
    from the ratio of the two then agree with those that read ``factor``.
    """
    import copy

    config: Any = copy.deepcopy(model.config)
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        raise UnsupportedModelError("this transformers version keeps no rope_parameters on the model config")
    if params.get("rope_type", "default") != "default":
        raise UnsupportedModelError(
            f"the model already scales its RoPE ({params.get('rope_type')!r}); yarn_factor applies to plain RoPE only"
        )
    window = int(config.max_position_embeddings)
    config.rope_parameters = {
        **params,
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": window,
    }
    config.max_position_embeddings = int(window * factor)
    return type(rotary)(config=config)
