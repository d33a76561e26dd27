"""How the next token is picked: `SamplingParams` (validated once per request) and the `Sampler`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict

import torch

from reattention_core.errors import InvalidInputError


class SamplingOptions(TypedDict, total=False):
    """The sampling keyword arguments of `ReAttentionEngine.generate`, ``stream`` and ``prepare``."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: str | Sequence[str] | None


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Args:
        max_new_tokens: most tokens to generate (>= 1).
        temperature: 0 for greedy decoding, else softmax temperature.
        top_p: nucleus sampling mass in (0, 1].
        top_k: sample among the k most likely tokens (0 = no limit).
        seed: seed of the sampler (``None``: nondeterministic when sampling).
        stop: strings that end generation; the matched stop string is not returned.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInputError(f"max_new_tokens must be an int >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):
            raise InvalidInputError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}")
        if not isinstance(self.stop, tuple):
            raise InvalidInputError(f"stop must be a tuple of strings (see normalize_stop), got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidInputError(f"stop sequences must be non-empty strings, got {s!r}")

    @classmethod
    def of(cls, sampling: SamplingParams | None = None, **options: Any) -> SamplingParams:
        """``sampling``, or the params the keyword ``options`` (`SamplingOptions`) describe; not both.

        Unknown keywords raise `TypeError`, as they would in a signature that lists them.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        if sampling is not None:
            if not isinstance(sampling, SamplingParams):
                raise InvalidInputError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
            if options:
                raise InvalidInputError(f"pass sampling=SamplingParams(...) or {', '.join(sorted(options))}=, not both")
            return sampling
        stop = cls.normalize_stop(options.pop("stop", None))
        return dataclasses.replace(cls(stop=stop), **options)

    @staticmethod
    def normalize_stop(stop: object) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            return (stop,)
        if not isinstance(stop, Sequence):
            raise InvalidInputError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        return tuple(stop)


class Sampler:
    """Picks tokens from logits on the CPU, so a seed gives the same tokens on every device."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token id from fp32 logits ``[V]``."""
        p = self.params
        logits = logits.detach().float().cpu()
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = logits.topk(p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token once the mass before it already reaches top_p (the first always stays)
            drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
            logits[order[drop]] = float("-inf")
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
