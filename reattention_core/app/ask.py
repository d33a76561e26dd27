"""Answer questions over a corpus, reusing its cached keys and values across questions and runs.

The corpus goes in with ``context=``, so every question over it shares one token prefix that the
prefix cache serves; `ask` warms the cache with ``engine.prefill(context=...)``, then streams the answer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from reattention_core.errors import CacheError, InvalidInputError
from reattention_core.generation.request import PrefillResult

# Wrapped around every question (after the corpus, so changing it never invalidates a cached
# corpus). The bare question: on the sample corpus the embedded 135M model answered more questions
# from the documents without an instruction line ("Answer using the documents above.") than with one.
QUESTION_TEMPLATE = "{question}"
CHAT_EXIT_WORDS = frozenset({"exit", "quit", ":q"})


@dataclass(frozen=True)
class AskSettings:
    """Sampling settings of an answer (greedy by default: the same corpus and question give the same answer)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature:
            raise InvalidInputError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass(frozen=True)
class AskReport:
    """What one question cost.

    Attributes:
        corpus_tokens: tokens rendered before the question (chat template, corpus, separator).
        cached_tokens: of those, tokens restored from the prefix cache (memory or disk) by this run.
        prefilled_tokens: corpus tokens computed and cached by this run (whole pages only).
        prefill_s: seconds spent restoring and prefilling the corpus.
        answer: the streamed answer text.
        answer_s: seconds from the question to the end of the answer.
    """

    corpus_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    prefill_s: float
    answer: str
    answer_s: float


def question_prompt(question: str) -> str:
    """The user text that follows the corpus; `InvalidInputError` for an empty question."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError('the question is empty; pass one with -q "..." (or type one at the prompt)')
    return QUESTION_TEMPLATE.format(question=question.strip())


def ask(
    engine,  # a ReAttentionEngine; not imported here so that `reattention --help` stays fast
    corpus: str,
    question: str,
    settings: AskSettings = AskSettings(),
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    progress: bool = True,
) -> AskReport:
    """Stream the answer to ``question`` about ``corpus`` to ``out``; cache statistics go to ``err``."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    prompt = question_prompt(question)
    t0 = time.perf_counter()
    try:
        warm = engine.prefill(context=corpus, progress=progress)
        note = f"{warm.cached_tokens:,} from the cache, {warm.prefilled_tokens:,} prefilled and cached"
    except CacheError:  # an engine built with cache=False: the answer below prefills the whole prompt
        warm = PrefillResult(
            prompt_tokens=len(engine.encode(prompt, context=corpus)),
            cached_tokens=0,
            stored_tokens=0,
            prefilled_tokens=0,
        )
        note = "the prefix cache is off for this engine"
    prefill_s = time.perf_counter() - t0
    print(f"corpus: {warm.prompt_tokens:,} tokens, {note} ({prefill_s:.1f}s)", file=err, flush=True)
    t1 = time.perf_counter()
    pieces = []
    for piece in _stream(engine, prompt, corpus, settings):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return AskReport(
        corpus_tokens=warm.prompt_tokens,
        cached_tokens=warm.cached_tokens,
        prefilled_tokens=warm.prefilled_tokens,
        prefill_s=prefill_s,
        answer="".join(pieces),
        answer_s=time.perf_counter() - t1,
    )


def _stream(engine, prompt: str, corpus: str, settings: AskSettings) -> Iterator[str]:
    gen = engine.stream(
        prompt,
        context=corpus,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        progress=False,
    )
    try:
        yield from gen
    finally:
        gen.close()  # Ctrl-C mid-answer: release the engine (its lock, the borrowed cache pages) now


def chat(
    engine,
    corpus: str,
    settings: AskSettings = AskSettings(),
    *,
    first_question: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Read questions until end of input (Ctrl-D) or ``exit``; answer each over the cached corpus.

    Ctrl-C during an answer stops that answer and returns to the prompt; at the prompt it ends the
    session. Returns the number of questions answered.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    answered = 0
    pending = first_question
    while True:
        if pending is not None:
            question, pending = pending, None
        else:
            try:
                question = read("question> ")
            except (EOFError, KeyboardInterrupt):
                print(file=err)
                return answered
        if question.strip().lower() in CHAT_EXIT_WORDS:
            return answered
        if not question.strip():
            continue
        try:
            ask(engine, corpus, question, settings, out=out, err=err, progress=answered == 0)
            answered += 1
        except KeyboardInterrupt:
            out.write("\n")
            print("(answer interrupted)", file=err, flush=True)


__all__ = ["QUESTION_TEMPLATE", "AskReport", "AskSettings", "ask", "chat", "question_prompt"]
