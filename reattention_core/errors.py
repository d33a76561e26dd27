"""Typed errors. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class ReAttentionError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(ReAttentionError, ValueError):
    """A `ReAttentionConfig` (or a value given for one) is invalid."""


class UnsupportedModelError(ReAttentionError, ValueError):
    """The model's architecture or RoPE variant cannot run under ReAttention."""


class ModelNotFoundError(ReAttentionError, FileNotFoundError):
    """The requested model, or the embedded default model, is not installed."""


class InvalidInputError(ReAttentionError, ValueError):
    """A prompt, message list or generation parameter is malformed."""


class ContextLimitError(InvalidInputError):
    """The prompt plus the requested output exceeds the configured maximum context."""


class StoreMemoryError(ReAttentionError, MemoryError):
    """The KV store cannot grow: the device (or pinned host) memory it needs is not there."""


class CacheError(ReAttentionError):
    """The prefix cache cannot do what was asked (it is off, or a prompt cannot be cached)."""


class PageError(CacheError):
    """A page file of the disk cache failed verification (``args``: the reason, the path); the cache
    drops it and recomputes its tokens."""


class PageMissing(CacheError):
    """A page file of the disk cache is not there (a plain miss: nothing to warn about)."""


class CorpusError(InvalidInputError):
    """Documents given to ``reattention ask`` cannot be used (missing, binary, not UTF-8, empty)."""


class DistributedError(ReAttentionError):
    """A sharded (multi-process) engine cannot go on: a rank failed or the process group is unusable."""
