"""`CacheConfig`: the settings of an engine's prefix cache, and their defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from reattention_core.cache.directory import default_cache_dir, default_max_bytes, parse_bytes
from reattention_core.config import ReAttentionConfig
from reattention_core.errors import ConfigError, InvalidInputError

# Pages are at least this many tokens by default (rounded up to a multiple of the prefill chunk).
DEFAULT_PAGE_TOKENS = 1024


def default_page_size(prefill_chunk_size: int) -> int:
    """The smallest multiple of ``prefill_chunk_size`` that is at least 1024 tokens."""
    return prefill_chunk_size * max(1, -(-DEFAULT_PAGE_TOKENS // prefill_chunk_size))


def default_memory_bytes(device: torch.device) -> int:
    """A third of the GPU's memory for CUDA, a third of physical RAM otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 3
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 3
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Settings of the engine's prefix cache.

    Args:
        enabled: keep and reuse prefilled pages at all (``False``: every prompt is prefilled cold).
        page_size: tokens per page, a multiple of ``prefill_chunk_size`` (default: the smallest
            multiple >= 1024). Smaller pages reuse more of a prompt that diverges mid-page (the
            tokens after the last full page before the final token are always recomputed: on
            average half a page) but make more files.
        memory_bytes: cap on the stores kept in memory (default: a third of RAM, or of GPU memory).
        disk: also keep pages on disk, across processes and restarts.
        dir: the disk cache directory (default: ``$REATTENTION_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/reattention``, else ``~/.cache/reattention``).
        disk_bytes: cap on the disk cache, LRU-evicted (default: ``$REATTENTION_CACHE_MAX_BYTES``,
            else 32 GiB); an int or a string like ``"64G"``.
    """

    enabled: bool = True
    page_size: int | None = None
    memory_bytes: int | None = None
    disk: bool = True
    dir: str | Path | None = None
    disk_bytes: int | str | None = None

    def __post_init__(self) -> None:
        for name in ("enabled", "disk"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"CacheConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.dir is not None and not isinstance(self.dir, (str, os.PathLike)):
            raise ConfigError(f"CacheConfig.dir must be a folder path or None, got {self.dir!r}")
        for name in ("page_size", "memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"CacheConfig.{name} must be a positive int or None, got {value!r}")
        if self.disk_bytes is not None:
            try:
                ok = parse_bytes(self.disk_bytes) >= 0 and not isinstance(self.disk_bytes, bool)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(
                    f"CacheConfig.disk_bytes must be a byte count like 34359738368 or '32G', got {self.disk_bytes!r}"
                )

    @classmethod
    def of(cls, value: CacheConfig | bool | None) -> CacheConfig:
        """``value`` as a `CacheConfig`: ``None``/``True`` the defaults (on), ``False`` off."""
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if not isinstance(value, CacheConfig):
            raise InvalidInputError(f"cache must be a CacheConfig or a bool, got {type(value).__name__}")
        return value

    def page_size_for(self, config: ReAttentionConfig) -> int:
        """The page size under ``config``; `ConfigError` if it is not a multiple of the prefill chunk."""
        chunk = config.prefill_chunk_size
        if self.page_size is None:
            return default_page_size(chunk)
        if self.page_size % chunk:
            raise ConfigError(
                f"CacheConfig.page_size ({self.page_size}) must be a multiple of prefill_chunk_size ({chunk}): "
                "a cached page must end on a prefill chunk boundary to be reused exactly. "
                f"Use page_size={default_page_size(chunk)} or leave it None."
            )
        return self.page_size

    def resolved_dir(self) -> Path:
        return Path(self.dir).expanduser() if self.dir is not None else default_cache_dir()

    def resolved_disk_bytes(self) -> int:
        return parse_bytes(self.disk_bytes) if self.disk_bytes is not None else default_max_bytes()
