"""Scoring answers: the fraction of expected strings an answer contains.

A number matches only as a whole number (``12345`` is not found in ``123456``) and a word only
as a whole word, case-insensitively. The score of one answer is ``found / expected`` (recall, as
RULER scores its multi-value tasks); a single-answer task scores 0 or 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from reattention_core.errors import InvalidInputError


def _pattern(expected: str) -> re.Pattern[str]:
    text = expected.strip()
    # Lookarounds instead of \b so that "12345" does not match inside "123456" or "a12345",
    # and multi-word answers ("Velmora Bay") match with any run of whitespace between words.
    body = r"\s+".join(re.escape(w) for w in text.split())
    return re.compile(rf"(?<![0-9A-Za-z]){body}(?![0-9A-Za-z])", re.IGNORECASE)


def found(answer: str, expected: Sequence[str]) -> list[str]:
    """The expected strings that occur in ``answer`` (each counted once, in the given order)."""
    if isinstance(expected, str) or not expected:
        raise InvalidInputError("expected must be a non-empty sequence of strings")
    out: list[str] = []
    for item in dict.fromkeys(expected):  # duplicates count once
        if not isinstance(item, str) or not item.strip():
            raise InvalidInputError(f"expected answers must be non-empty strings, got {item!r}")
        if _pattern(item).search(answer or ""):
            out.append(item)
    return out


def score(answer: str, expected: Sequence[str]) -> float:
    """Fraction of the distinct ``expected`` strings found in ``answer`` (0.0 .. 1.0)."""
    distinct = list(dict.fromkeys(expected)) if not isinstance(expected, str) else expected
    return len(found(answer, expected)) / len(distinct)
