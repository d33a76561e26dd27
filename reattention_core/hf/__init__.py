"""Hugging Face glue: the only part of the package that imports transformers."""

from reattention_core.hf.cache import ReAttentionCache
from reattention_core.hf.patch import enable_reattention

__all__ = ["ReAttentionCache", "enable_reattention"]
