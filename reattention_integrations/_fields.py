"""The settings every adapter shares (a pydantic mixin for LangChain and LlamaIndex classes alike)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from reattention_core.engine import ReAttentionEngine
from reattention_core.errors import InvalidInputError
from reattention_integrations._engine import EngineSettings, shared_engine
from reattention_integrations._generation import Sampling, merge_stop, split_call_options


class AdapterFields(BaseModel):
    """Model, ReAttention config, sampling and placement settings of an adapter.

    Construction only validates (typed `ConfigError` / `InvalidInputError` for bad values); the
    model loads on the first generation and is shared by every adapter with equal settings
    (`reattention_integrations.shared_engine`).
    """

    model: str | None = Field(
        default=None, description="Hugging Face model id or local directory; None: the embedded SmolLM2-135M-Instruct."
    )
    gguf_file: str | None = Field(default=None, description="GGUF file inside `model`, for GGUF checkpoints.")
    config: Any = Field(
        default=None,
        description=(
            "A ReAttentionConfig, or a dict of fields to change in the model's default config "
            "(its preset, else the paper's sizing), e.g. {'max_context': 200000}."
        ),
    )
    max_tokens: int = Field(default=256, ge=1, description="Most tokens to generate per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0: greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0: no limit.")
    seed: int | None = Field(default=None, description="Sampler seed (None: nondeterministic when sampling).")
    stop: list[str] | None = Field(default=None, description="Stop strings, merged with those given per call.")
    device: str | None = Field(default=None, description="'cuda' when available, else 'cpu'.")
    dtype: str | None = Field(
        default=None, description="float32 / bfloat16 / float16; default bf16 on GPU, fp32 on CPU."
    )
    cache_dir: str | None = Field(
        default=None, description="Prefix-cache directory (default $REATTENTION_CACHE_DIR or ~/.cache/reattention)."
    )
    progress: bool | None = Field(default=None, description="Prefill progress bar; None: only for long prompts.")
    engine: ReAttentionEngine | None = Field(
        default=None, exclude=True, repr=False, description="An engine you already built; overrides the settings above."
    )

    _settings: EngineSettings | None = PrivateAttr(default=None)

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        # Outside pydantic validation on purpose: a bad config raises our typed ConfigError
        # (with its hint) instead of a ValidationError wrapping it.
        if self.engine is None:
            self._settings = EngineSettings.create(
                self.model,
                gguf_file=self.gguf_file,
                config=self.config,
                device=self.device,
                dtype=self.dtype,
                cache_dir=self.cache_dir,
            )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value

    @field_validator("device", "cache_dir", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        return str(value) if value is not None and not isinstance(value, str) else value

    @property
    def model_name(self) -> str:
        """The name responses report (no model load needed unless an engine was passed in)."""
        if self.engine is not None:
            return self.engine.model_name
        assert self._settings is not None
        return self._settings.model_name

    def get_engine(self) -> ReAttentionEngine:
        """The engine, loading the model on the first call (blocking; async paths call it in a thread)."""
        if self.engine is not None:
            return self.engine
        assert self._settings is not None
        return shared_engine(self._settings)

    def _call_options(self, kwargs: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        kept = {k: v for k, v in kwargs.items() if k not in ignore}
        return split_call_options(kept, model_name=self.model_name, owner=type(self).__name__)

    def _sampling(self, stop: list[str] | str | None, options: dict[str, Any]) -> Sampling:
        """Field values overridden by call options; field and call stop strings are merged."""
        extra_stop = options.get("stop")
        if extra_stop is not None and stop is not None:
            raise InvalidInputError("pass stop once per call (as the stop argument), not twice")
        return Sampling(
            max_tokens=options.get("max_tokens", self.max_tokens),
            temperature=options.get("temperature", self.temperature),
            top_p=options.get("top_p", self.top_p),
            top_k=options.get("top_k", self.top_k),
            seed=options.get("seed", self.seed),
            stop=merge_stop(self.stop, stop if stop is not None else extra_stop),
        )
