"""`ReAttentionConfig`: the knobs of ReAttention, frozen and validated.

The package's vocabulary (sink, local window, middle, block, scope, prefill chunk, YaRN) is defined in
`ReAttentionConfig`'s docstring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from reattention_core.errors import ConfigError
from reattention_kernels.options import KernelOptions

Mode = Literal["reattention", "full", "streaming"]
MODES: tuple[str, ...] = ("reattention", "full", "streaming")


# Fields added after caches were saved, with their defaults: a config that leaves them there keeps
# the fingerprint it had before they existed, so those caches stay valid.
_LATER_FIELDS: dict[str, Any] = {"prefill_vote_stride": 1, "yarn_factor": None}
_NO_DEFAULT = object()


@dataclass(frozen=True, kw_only=True)
class ReAttentionConfig:
    """Settings of one ReAttention engine.

    Vocabulary (one name per concept, used everywhere in this package):

    * **sink** - the first ``sink_size`` tokens, always attended (attention sinks + instruction head).
    * **local window** - the last ``local_window`` tokens, always attended; the current prefill chunk
      or decode token sits at its tail.
    * **middle** - everything between sink and local window. It is never attended in full: each
      query row and query head scores it with raw ``q . k`` (no positions), keeps its ``top_k`` best
      keys ("hits"), hits are pooled over the rows and heads of the layer with one vote each, the
      ``max_blocks`` most-voted hits are kept, and each kept hit is widened to a **block** of
      ``block_size`` tokens centred on it.
    * **scope** - ``[sink | selected blocks in original order | local window]``; RoPE is applied to the
      scope at fresh contiguous positions ``0 .. L-1``, so positions never exceed
      ``scope_size = sink_size + max_blocks * block_size + local_window``.
    * **prefill chunk** - the step of chunked prefill, ``prefill_chunk_size`` tokens (at most the local
      window, so a chunk always fits in it). All of a chunk's rows vote for its selection, or with
      ``prefill_vote_stride`` S > 1 only every S-th row counting back from the chunk's last one.
    * **YaRN** - ``yarn_factor`` F rescales the model's RoPE frequencies (YaRN, Peng et al. 2023) so that
      F times the pre-training window becomes usable; with ``mode="full"`` this is the usual way to
      stretch a model's window (Qwen2.5's own advice past 32K is F = 4), the baseline ReAttention is
      measured against.

    Args:
        mode: ``"reattention"`` (sink + selected blocks + local window), ``"full"`` (plain causal
            attention over every token at its original position: the baseline) or
            ``"streaming"`` (sink + local window only, StreamingLLM).
        sink_size: tokens at the start that are always attended.
        block_size: width of the block kept around each selected hit (the paper's *span*).
        top_k: hits kept per query row and query head when scoring the middle.
        max_blocks: most-voted hits kept per layer and step (the paper's *k'*).
        local_window: most recent tokens that are always attended.
        prefill_chunk_size: tokens per prefill step; must not exceed ``local_window``.
        prefill_vote_stride: a prefill chunk selects with every ``S``-th query row only (rows
            ``TQ-1, TQ-1-S, ...``: the chunk's last row, at a prompt's end the question, always
            votes); decode steps are unchanged. 1 (the default) is the paper's selection, every row.
            Larger strides cut prefill scoring about S-fold, and change what prefill selects:
            an opt-in speed knob (docs/design-notes.md, "Selection semantics").
        max_context: largest prompt + completion the engine accepts, in tokens; ``None`` means
            bounded only by memory. Prompts over it raise `ContextLimitError` (never truncated).
        yarn_factor: rescale the model's RoPE with YaRN by this factor (> 1) over its pre-training
            window, as transformers' ``rope_type="yarn"`` does; ``None`` (default) keeps the model's
            own RoPE. Meant for ``mode="full"``: full attention to ``factor x window`` positions.
    """

    mode: Mode = "reattention"
    sink_size: int = 32
    block_size: int = 32
    top_k: int = 4
    max_blocks: int = 127
    local_window: int = 4096
    prefill_chunk_size: int = 512
    prefill_vote_stride: int = 1
    max_context: int | None = None
    yarn_factor: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        ints = ("sink_size", "block_size", "top_k", "max_blocks", "local_window", "prefill_chunk_size",
                "prefill_vote_stride")  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        for name in ints[1:]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sink_size < 0:
            raise ConfigError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.prefill_chunk_size > self.local_window:
            raise ConfigError(
                f"prefill_chunk_size ({self.prefill_chunk_size}) exceeds local_window ({self.local_window}): "
                "a prefill chunk must fit in the local window. Lower prefill_chunk_size or raise local_window."
            )
        if self.max_context is not None:
            if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 1:
                raise ConfigError(f"max_context must be a positive int or None, got {self.max_context!r}")
        if self.yarn_factor is not None:
            f = self.yarn_factor
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 1.0 or f != f or f == float("inf"):
                raise ConfigError(
                    f"yarn_factor must be a number > 1 (e.g. 4.0 stretches a 32K window to 128K) or None, got {f!r}"
                )
            object.__setattr__(self, "yarn_factor", float(f))

    @property
    def scope_size(self) -> int | None:
        """Largest number of keys one query attends to (``None`` for ``mode="full"``: unbounded)."""
        if self.mode == "full":
            return None
        selected = self.max_blocks * self.block_size if self.mode == "reattention" else 0
        return self.sink_size + selected + self.local_window

    def window_for(self, window: int) -> int:
        """Positions usable under this config for a model pre-trained on ``window`` (YaRN stretches them)."""
        return window if self.yarn_factor is None else int(window * self.yarn_factor)

    def check_window(self, window: int) -> None:
        """Raise `ConfigError` if the scope does not fit in the model's pre-training window.

        The whole point of ReAttention is that positions stay inside the range the model was
        trained on; a scope larger than the window re-introduces unseen positions. With
        ``yarn_factor`` the bound is the stretched window.
        """
        usable = self.window_for(window)
        scope = self.scope_size
        if scope is not None and scope > usable:
            blocks = self.max_blocks if self.mode == "reattention" else 0
            stretched = "" if usable == window else f" (x{self.yarn_factor:g} with YaRN: {usable})"
            raise ConfigError(
                f"attention scope {scope} tokens (sink {self.sink_size} + {blocks} blocks x {self.block_size} + local "
                f"{self.local_window}) exceeds the model's pre-training window of {window} positions{stretched}. "
                f"Lower max_blocks, block_size or local_window (ReAttentionConfig.for_window({window}) gives the "
                "paper's sizing)."
            )

    @classmethod
    def for_window(cls, window: int, **overrides: Any) -> ReAttentionConfig:
        """The paper's sizing for a model pre-trained on ``window`` positions.

        Sink 32, blocks of 32, top-4 per head, prefill chunks of 512 (at most the local window).
        The local window is half the pre-training window and the blocks fill the rest, as the
        authors ran LLaMA3-8B (8K: 32 + 127 x 32 + 4096 = 8192); for long-window models they
        capped the scope at 32 + 256 x 32 + 8192 = 16,416 (LLaMA3.1/3.2, Mistral-v0.3, Qwen2.5,
        InternLM2.5), and so does this rule: local window <= 8192, at most 256 blocks.
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 128:
            raise ConfigError(f"window must be an int >= 128, got {window!r}")
        sink, block = 32, 32
        local = min(window // 2, 8192)
        values: dict[str, Any] = dict(
            sink_size=sink,
            block_size=block,
            top_k=4,
            max_blocks=max(1, min(256, (window - sink - local) // block)),
            local_window=local,
            prefill_chunk_size=min(512, local),
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ReAttentionConfig:
        """A measured preset by name (see `PRESETS` for how each one was chosen; `preset_for` finds a
        model's)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> ReAttentionConfig:
        """A copy with ``changes`` applied (and validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown ReAttentionConfig fields {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReAttentionConfig:
        """Inverse of `to_dict`; unknown keys raise `ConfigError` (typos are never ignored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown ReAttentionConfig keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """Stable short hash of the settings that change what the model computes."""
        data = {k: v for k, v in self.to_dict().items() if _LATER_FIELDS.get(k, _NO_DEFAULT) != v}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, ReAttentionConfig] = {
    # SmolLM2-135M-Instruct (8K pre-training window) retrieves well only from a short scope, far less than
    # the paper's sizing (the whole window); this one came from a sweep of block size, blocks and local
    # window (docs/design-notes.md, "Presets"). The sink is 64, not 32, so that it holds the chat template's
    # system turn and the task instruction (about 42 tokens): with 32, the instruction's end sat in the
    # middle and the persistent misses echoed it. Scope: 64 + 32 x 32 + 256 = 1344 tokens.
    "smollm2-135m": ReAttentionConfig(
        sink_size=64, block_size=32, top_k=4, max_blocks=32, local_window=256, prefill_chunk_size=256
    ),
    # Qwen2.5-Coder-1.5B-Instruct (32K window) reads well across its window: tighter scopes lost the
    # needles hidden among distractor keys, so its preset is the paper's sizing, `for_window(32768)`,
    # named so that the choice is on record (docs/design-notes.md, "Presets").
    "qwen2.5-coder-1.5b": ReAttentionConfig(
        sink_size=32, block_size=32, top_k=4, max_blocks=256, local_window=8192, prefill_chunk_size=512
    ),
}


def preset_for(name_or_path: str | None) -> str | None:
    """The name of the measured preset for a model known by ``name_or_path`` (a hub id, a folder or
    a GGUF file's path), if there is one: a `PRESETS` name found in it, case, spaces and underscores
    aside. ``None`` stands for the embedded model."""
    if name_or_path is None:
        return "smollm2-135m"
    text = re.sub(r"[\s_]+", "-", str(name_or_path).lower())
    return next((name for name in PRESETS if name in text), None)


@dataclass(frozen=True)
class RunSettings:
    """An engine's settings for one generation (an engine may change them between generations).

    Attributes:
        config: the ReAttention settings.
        kernel_options: the kernels' settings.
        cuda_graphs: replay steps from CUDA graphs where they apply.
        compile_model: run the decoder layers compiled (their pages get a fingerprint of their own).
    """

    config: ReAttentionConfig
    kernel_options: KernelOptions = KernelOptions()
    cuda_graphs: bool = True
    compile_model: bool = False
