"""ReAttention: unbounded context with a finite attention scope for Hugging Face RoPE models.

Quick start::

    from reattention_core import ReAttentionEngine
    engine = ReAttentionEngine.from_pretrained()      # the embedded SmolLM2-135M-Instruct
    print(engine.generate([{"role": "user", "content": "What is the capital of France?"}]).text)
"""

from reattention_core.cache import CacheConfig, CacheInfo
from reattention_core.config import PRESETS, ReAttentionConfig
from reattention_core.engine import PrefillResult, ReAttentionEngine
from reattention_core.errors import (
    CacheError,
    ConfigError,
    ContextLimitError,
    InvalidInputError,
    ModelNotFoundError,
    ReAttentionError,
    StoreMemoryError,
    UnsupportedModelError,
)
from reattention_core.generation.request import GenerationResult, Request, TextStream
from reattention_core.generation.sampling import SamplingParams
from reattention_core.hf import ReAttentionCache, enable_reattention
from reattention_core.store import KVStore, OffloadConfig, ResidentStore

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CacheConfig",
    "CacheError",
    "CacheInfo",
    "ConfigError",
    "ContextLimitError",
    "GenerationResult",
    "InvalidInputError",
    "KVStore",
    "ModelNotFoundError",
    "OffloadConfig",
    "PrefillResult",
    "ReAttentionCache",
    "ReAttentionConfig",
    "ReAttentionEngine",
    "ReAttentionError",
    "Request",
    "ResidentStore",
    "SamplingParams",
    "StoreMemoryError",
    "TextStream",
    "UnsupportedModelError",
    "enable_reattention",
]
