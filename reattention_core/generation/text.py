"""Generated token ids as text: safe-to-emit deltas, stop strings, and the generation's result."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from reattention_core.generation.request import GenerationResult


class TextAssembler:
    """Turns generated token ids into safe-to-emit text deltas, honouring stop strings.

    Text that could still become a stop string, and a trailing incomplete UTF-8 character, is
    held back until it is resolved.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
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

    def stream(self, tokens: Iterable[int]) -> Iterator[str]:
        """The deltas of ``tokens`` as they come; stops pulling tokens at a stop string."""
        for token in tokens:
            delta = self.push(token)
            if delta:
                yield delta
            if self.stopped:
                return

    def result(self, *, prompt_tokens: int, cached_tokens: int, max_new_tokens: int) -> GenerationResult:
        """The `GenerationResult` once generation has ended: ``"stop"`` at a stop string or the
        end-of-sequence token (fewer than ``max_new_tokens`` tokens), else ``"length"``."""
        finish = "stop" if self.stopped or len(self.ids) < max_new_tokens else "length"
        return GenerationResult(
            text=self.text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(self.ids),
            finish_reason=finish,
            token_ids=tuple(self.ids),
            cached_tokens=cached_tokens,
        )
