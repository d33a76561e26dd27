"""Sampling, stop strings and incremental detokenisation for the engine's decode loop."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reattention_core.errors import InvalidInputError


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

    @staticmethod
    def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
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


class TextAssembler:
    """Turns generated token ids into safe-to-emit text deltas, honouring stop strings.

    Text that could still become a stop string, and a trailing incomplete UTF-8 character, is
    held back until it is resolved.
    """

    def __init__(self, tokenizer: object, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show (maybe empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._emit(cut)
        return self._emit(len(text) - self._held_back(text))

    def finish(self) -> str:
        """Everything not yet emitted (call once generation has ended)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
