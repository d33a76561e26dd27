"""One shared `ReAttentionEngine` per distinct set of settings, built on first use.

Adapters are built often and must be cheap, so they keep only an `EngineSettings` and ask
`shared_engine` on first generation: equal settings, in any thread, get the same engine and prefix cache.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reattention_core.cache import CacheConfig
from reattention_core.config import ReAttentionConfig
from reattention_core.embedded import EMBEDDED_NAME, EMBEDDED_PRESET
from reattention_core.engine import ReAttentionEngine
from reattention_core.errors import ConfigError, InvalidInputError
from reattention_core.loading import default_device, default_dtype

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineSettings:
    """What identifies a shared engine. Build one with `EngineSettings.create` (it normalises).

    Attributes:
        model: Hugging Face model id or local directory; ``None``: the embedded SmolLM2-135M-Instruct.
        gguf_file: GGUF file name inside ``model`` (GGUF checkpoints only).
        config: a complete ReAttention config; ``None``: the model's default (its preset, else the
            paper's sizing for its pre-training window), with ``config_overrides`` applied.
        config_overrides: ``(field, value)`` pairs applied to the model's default config (what a
            dict given as ``config`` becomes), e.g. ``(("max_context", 200_000),)``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: one of ``float32``, ``bfloat16``, ``float16``.
        cache_dir: prefix-cache directory, resolved when the settings are created.
    """

    model: str | None
    gguf_file: str | None
    config: ReAttentionConfig | None
    config_overrides: tuple[tuple[str, Any], ...]
    device: str
    dtype: str
    cache_dir: str

    @classmethod
    def create(
        cls,
        model: str | Path | None = None,
        *,
        gguf_file: str | None = None,
        config: ReAttentionConfig | Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        cache_dir: str | Path | None = None,
    ) -> EngineSettings:
        """Validate and normalise, so equal settings spelled differently share one engine.

        ``config`` is a complete `ReAttentionConfig`, or a dict of fields to change in the model's
        default config (``{"max_context": 200_000}`` keeps the embedded model's measured preset).

        Raises:
            ConfigError: an unknown config key or bad value, dtype or device.
        """
        if model is not None and not isinstance(model, (str, Path)):
            raise InvalidInputError(f"model must be a model id, a local path or None, got {type(model).__name__}")
        if gguf_file is not None and model is None:
            raise ConfigError("gguf_file needs model= (the directory or repository that holds it)")
        full, overrides = _config(config, embedded=model is None)
        return cls(
            model=str(model) if model is not None else None,
            gguf_file=gguf_file,
            config=full,
            config_overrides=overrides,
            device=_device(device),
            dtype=_dtype(dtype, device),
            # Resolved now: two adapters created under different $REATTENTION_CACHE_DIR values
            # must not share an engine that writes to only one of them.
            cache_dir=str(CacheConfig(dir=cache_dir).resolved_dir().resolve()),
        )

    @property
    def max_context(self) -> int | None:
        """The configured cap on prompt + completion tokens (``None``: memory is the only bound)."""
        overrides = dict(self.config_overrides)
        if "max_context" in overrides:
            return overrides["max_context"]
        return self.config.max_context if self.config is not None else None

    @property
    def model_name(self) -> str:
        """The display name responses report (the embedded model's name for ``model=None``)."""
        return self.model if self.model is not None else EMBEDDED_NAME

    def build(self) -> ReAttentionEngine:
        """Load the model (seconds to minutes); `shared_engine` calls this once per settings."""
        cache = CacheConfig(dir=self.cache_dir)
        engine = ReAttentionEngine.from_pretrained(
            self.model,
            gguf_file=self.gguf_file,
            config=self.config,
            device=self.device,
            dtype=_DTYPES[self.dtype],
            cache=cache,
        )
        if not self.config_overrides:
            return engine
        # The default config is known only once the model is loaded (preset or pre-training window).
        config = engine.config.replace(**dict(self.config_overrides))
        return ReAttentionEngine(engine.model, engine.tokenizer, config, model_name=engine.model_name, cache=cache)


class _Slot:
    """One registry entry: its own lock, so loading one model never blocks another."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.engine: ReAttentionEngine | None = None


_registry_lock = threading.Lock()
_slots: dict[EngineSettings, _Slot] = {}


def _slot(settings: EngineSettings) -> _Slot:
    if not isinstance(settings, EngineSettings):
        raise InvalidInputError(f"expected EngineSettings, got {type(settings).__name__}")
    with _registry_lock:
        return _slots.setdefault(settings, _Slot())


def shared_engine(settings: EngineSettings) -> ReAttentionEngine:
    """The process-wide engine for ``settings``, loading it on the first call (thread-safe).

    A failed load leaves nothing behind: the next call tries again.
    """
    slot = _slot(settings)
    with slot.lock:
        if slot.engine is None:
            slot.engine = settings.build()
        return slot.engine


def register_engine(settings: EngineSettings, engine: ReAttentionEngine) -> ReAttentionEngine:
    """Make an engine you already loaded the shared one for ``settings``.

    Adapters created with those settings then use it instead of loading the model again. Returns
    the engine in the registry, which is ``engine`` unless another engine was registered (or built)
    for these settings first: that one stays, so adapters never see two engines for one setting.
    """
    if not isinstance(engine, ReAttentionEngine):
        raise InvalidInputError(f"expected a ReAttentionEngine, got {type(engine).__name__}")
    slot = _slot(settings)
    with slot.lock:
        if slot.engine is None:
            slot.engine = engine
        return slot.engine


def _config(
    config: ReAttentionConfig | Mapping[str, Any] | None, *, embedded: bool
) -> tuple[ReAttentionConfig | None, tuple[tuple[str, Any], ...]]:
    """(complete config or None, overrides of the model's default config)."""
    if config is None or isinstance(config, ReAttentionConfig):
        return config, ()
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"config must be a ReAttentionConfig, a dict of its fields or None, got {type(config).__name__}"
        )
    known = {f.name for f in dataclasses.fields(ReAttentionConfig)}
    unknown = set(config) - known
    if unknown:
        raise ConfigError(f"unknown ReAttentionConfig keys {sorted(unknown)}; valid keys: {sorted(known)}")
    if embedded:  # the default is known without loading anything: check the values now
        ReAttentionConfig.preset(EMBEDDED_PRESET).replace(**config)
    return None, tuple(sorted(config.items()))


def _device(device: str | torch.device | None) -> str:
    if device is None:
        return default_device()
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc


def _dtype(dtype: str | torch.dtype | None, device: str | torch.device | None) -> str:
    if dtype is None:
        dtype = default_dtype(_device(device))
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(dtype, dtype)
        name = name.removeprefix("torch.")
    else:
        raise ConfigError(f"dtype must be a string or a torch.dtype, got {type(dtype).__name__}")
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return name
