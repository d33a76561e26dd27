"""Exact tokenisation of long texts on all cores.

A Hugging Face tokenizer encodes one string on one thread; `encode` cuts a long text at safe points,
encodes the pieces as one batch and joins the ids, checking each cut so the ids equal a whole encode.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

from reattention_core.errors import InvalidInputError

# Texts shorter than this are encoded in one call; longer ones in pieces of about this size.
PIECE_CHARS = 1 << 16
# No cut within this many characters of ``cut`` (the piece holding it is encoded with offsets).
_CUT_MARGIN = 256
# The check around a cut spans at least this many characters on each side.
_CHECK_CHARS = 256
_SAFE = re.compile(r"(?<=\S) ")


def encode(
    tokenizer: Any, text: str, *, add_special_tokens: bool, cut: int | None = None, piece_chars: int = PIECE_CHARS
) -> tuple[list[int], int | None]:
    """Token ids of ``text``, equal to ``tokenizer(text)["input_ids"]``, and the tokens before ``cut``.

    Cuts are at *safe points* (a space that follows a non-space); the batch runs on all cores. That is
    exact only for tokenizers that never merge across such a point (byte-level BPE with GPT-2 or
    Llama-3 split patterns, SentencePiece models that split on spaces), not for those that prepend a
    marker or a space to every string. So the text around every cut must encode to the same ids whole
    and in two halves; if any check fails, the tokenizer is not a fast one, or a special token holds a
    space, the text is encoded in one piece.

    Args:
        cut: a character offset (where a question starts); the second result is then how many
            leading tokens end at or before it (``None`` if that is none or all of them, or when
            the tokenizer gives no offsets), else ``None``.
        piece_chars: target piece length (tests use small ones).
    """
    check_text(text)
    if len(text) >= 2 * piece_chars and getattr(tokenizer, "is_fast", False) and _spaceless_specials(tokenizer):
        cuts = _cuts(text, piece_chars, cut)
        if cuts and _cuts_are_exact(tokenizer, text, cuts):
            return _encode_pieces(tokenizer, text, cuts, add_special_tokens, cut)
    return _encode_whole(tokenizer, text, add_special_tokens, cut)


def check_text(text: str) -> None:
    """`InvalidInputError` unless ``text`` is valid Unicode (UTF-8 encodable: no lone surrogate).

    JSON and Python strings may carry lone surrogates (``"\\ud800"``); tokenizers fail on them with
    an untyped error, so they are rejected here with the position.
    """
    if text.isascii():  # a flag of the string: no scan
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"the prompt holds a lone surrogate (U+{ord(text[exc.start]):04X}, character {exc.start} of the text as "
            "rendered), which is not valid Unicode; fix the encoding of the input (e.g. decode bytes with "
            "errors='replace')"
        ) from None


def _encode_whole(tokenizer: Any, text: str, add_special_tokens: bool, cut: int | None) -> tuple[list[int], int | None]:
    if cut is None:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), None
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (TypeError, KeyError, ValueError, NotImplementedError):  # a tokenizer without offsets
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        tail = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
        return ids, _suffix_boundary(ids, tail)
    ids = list(enc["input_ids"])
    return ids, _boundary(offsets, cut, 0, len(ids))


def _boundary(offsets: Sequence[Sequence[int]], cut: int, before: int, total: int) -> int | None:
    """``before`` plus the leading tokens of ``offsets`` that end at or before ``cut``, if a proper split."""
    n = 0
    while n < len(offsets) and offsets[n][1] <= cut:
        n += 1
    n += before
    return n if 0 < n < total else None


def _suffix_boundary(ids: Sequence[int], suffix: Sequence[int]) -> int | None:
    """``len(ids) - len(suffix)`` if ``suffix`` ends ``ids`` and leaves a non-empty head, else ``None``."""
    n = len(suffix)
    if 0 < n < len(ids) and list(ids[-n:]) == list(suffix):
        return len(ids) - n
    return None


def _spaceless_specials(tokenizer: Any) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return not any(" " in str(getattr(tok, "content", tok)) for tok in added.values())


def _cuts(text: str, piece_chars: int, cut: int | None) -> list[int]:
    """Safe points about ``piece_chars`` apart, none near ``cut`` or the ends of ``text``."""
    cuts: list[int] = []
    pos = piece_chars
    while pos < len(text) - piece_chars:
        m = _SAFE.search(text, pos)
        if m is None or m.start() >= len(text) - _CHECK_CHARS:
            break
        s = m.start()
        if cut is not None and abs(s - cut) <= _CUT_MARGIN:
            pos = cut + _CUT_MARGIN + 1
            continue
        if s > _CHECK_CHARS and (not cuts or s - cuts[-1] > 2 * _CHECK_CHARS):
            cuts.append(s)
        pos = s + piece_chars
    return cuts


def _window_edge(text: str, s: int, step: int) -> int:
    """The safe point at least ``_CHECK_CHARS`` from ``s`` in direction ``step``, or the text's end."""
    if step > 0:
        m = _SAFE.search(text, s + _CHECK_CHARS)
        return m.start() if m is not None else len(text)
    pos = s - _CHECK_CHARS
    while pos > 0:  # search backwards in strides (``re`` has no reverse search)
        matches = list(_SAFE.finditer(text, max(0, pos - 4 * _CHECK_CHARS), pos + 1))
        if matches:
            return matches[-1].start()
        pos -= 4 * _CHECK_CHARS
    return 0


def _cuts_are_exact(tokenizer: Any, text: str, cuts: Sequence[int]) -> bool:
    """Whether the text around every cut encodes to the same ids whole and split there."""
    whole, halves = [], []
    for s in cuts:
        a, b = _window_edge(text, s, -1), _window_edge(text, s, +1)
        whole.append(text[a:b])
        halves += [text[a:s], text[s:b]]
    ids = tokenizer(whole + halves, add_special_tokens=False)["input_ids"]
    n = len(cuts)
    return all(list(ids[i]) == list(ids[n + 2 * i]) + list(ids[n + 2 * i + 1]) for i in range(n))


def _encode_pieces(
    tokenizer: Any, text: str, cuts: Sequence[int], add_special_tokens: bool, cut: int | None
) -> tuple[list[int], int | None]:
    edges = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(edges)]
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    head: list[int] = []
    tail: list[int] = []
    if add_special_tokens:  # what the post-processor wraps around one sequence (BOS, maybe EOS)
        bare = list(encoded[0])
        wrapped = list(tokenizer(pieces[0], add_special_tokens=True)["input_ids"])
        at = _find(wrapped, bare)
        if at is None:  # a post-processor that does more than wrap: no cuts
            return _encode_whole(tokenizer, text, add_special_tokens, cut)
        head, tail = wrapped[:at], wrapped[at + len(bare) :]
    ids = list(head)
    for piece in encoded:
        ids.extend(piece)
    ids.extend(tail)
    if cut is None:
        return ids, None
    k = next(i for i in range(len(pieces)) if edges[i] <= cut < edges[i + 1] or i == len(pieces) - 1)
    before = len(head) + sum(len(p) for p in encoded[:k])
    try:
        offsets = tokenizer(pieces[k], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (TypeError, KeyError, ValueError, NotImplementedError):  # pragma: no cover - fast tokenizers have them
        return _encode_whole(tokenizer, text, add_special_tokens, cut)
    return ids, _boundary(offsets, cut - edges[k], before, len(ids))


def _find(seq: Sequence[int], sub: Sequence[int]) -> int | None:
    """Start of ``sub`` in ``seq`` when ``seq`` is ``sub`` with a few ids around it."""
    for at in range(len(seq) - len(sub) + 1):
        if list(seq[at : at + len(sub)]) == list(sub):
            return at
    return None
