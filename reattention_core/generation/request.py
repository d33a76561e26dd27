"""What one generation is made of: a validated request, its text stream, and its result.

`ReAttentionEngine.prepare` makes a `Request` (bad input raises there, before any work);
`ReAttentionEngine.start` runs it and returns a `TextStream` holding the final `GenerationResult` once
it ends. The adapters and the server use these two steps, as they need the usage after the last piece.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from types import TracebackType

from reattention_core.generation.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationResult:
    """What `ReAttentionEngine.generate` returns (and `TextStream.result` holds).

    Attributes:
        text: the completion (stop string excluded).
        prompt_tokens: tokens in the prompt as the model saw it (chat template included).
        completion_tokens: tokens generated.
        finish_reason: ``"stop"`` (a stop string or the end-of-sequence token) or ``"length"``.
        token_ids: the generated token ids.
        cached_tokens: prompt tokens whose keys and values came from the prefix cache (memory or
            disk) instead of being prefilled.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()
    cached_tokens: int = 0


@dataclass(frozen=True)
class PrefillResult:
    """What `ReAttentionEngine.prefill` returns.

    Attributes:
        prompt_tokens: tokens of the text as rendered.
        cached_tokens: of those, tokens that were already cached (memory or disk).
        stored_tokens: tokens now cached (whole pages; the tail after the last full page is not).
        prefilled_tokens: tokens computed by this call.
    """

    prompt_tokens: int
    cached_tokens: int
    stored_tokens: int
    prefilled_tokens: int


@dataclass(frozen=True)
class Request:
    """A prompt ready to run: its token ids (chat template applied) and how to sample.

    Build it with `ReAttentionEngine.prepare`, which checks the prompt, the sampling arguments
    and the configured ``max_context``; it can then be started on that engine from any thread.
    """

    ids: tuple[int, ...]
    params: SamplingParams
    # Prompts built with ``context=``: tokens before the question. Prefill breaks its chunks
    # there and the prefix cache keeps the corpus up to that token, so the next question over
    # the same corpus prefills only itself. ``None`` for other prompts.
    context_tokens: int | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


class TextStream(Iterator[str]):
    """The text of one running generation, piece by piece; ``result`` once it has ended.

    Iterating drives the generation (nothing runs between two ``next`` calls). After the last
    piece, ``result`` is the `GenerationResult`; it is also the value of the final
    ``StopIteration``, so ``result = yield from stream`` works. ``close()`` (or leaving a ``with``
    block) stops early and releases the engine; ``result`` then stays ``None``. Iterate and close
    from one thread.
    """

    def __init__(self, run: Generator[str, None, GenerationResult]) -> None:
        self._run = run
        self._result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._run)
        except StopIteration as done:
            self._result = done.value
            raise

    @property
    def result(self) -> GenerationResult | None:
        """The finished generation's result, or ``None`` while it runs or if it was closed early."""
        return self._result

    def collect(self) -> GenerationResult:
        """Run to the end and return the result (the pieces are discarded)."""
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Stop the generation now (a no-op once it has ended); the cached corpus is left intact."""
        self._run.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["GenerationResult", "PrefillResult", "Request", "TextStream"]
