"""Haystacks: long text of an exact token length with needles inserted at chosen depths.

Text kinds (essays, stdlib docs, filler, noise) are `source_text`'s; the text is cut into pieces
tokenized one by one, so a token count is a prefix sum and a needle goes between two pieces (`Haystack`).
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from reattention_core.errors import InvalidInputError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACK_KINDS = ("essays", "docs", "filler", "noise")

# Fixed and sorted: the order of the text must not depend on what else was imported.
DOCSTRING_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)

_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n\s*\n")


@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Paragraphs of the docstrings of `DOCSTRING_MODULES` (module, its classes, functions, methods).

    Deterministic: modules in list order, members sorted by name, only objects defined in that
    module, duplicates dropped (inherited docstrings repeat).
    """
    seen: set[str] = set()
    out: list[str] = []

    def take(obj: Any) -> None:
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if not doc:
            return
        for para in inspect.cleandoc(doc).split("\n\n"):
            para = " ".join(para.split())
            # Keep prose; drop signatures, tables and one-word lines.
            if len(para) >= 60 and sum(c.isalpha() for c in para) > 0.6 * len(para) and para not in seen:
                seen.add(para)
                out.append(para)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOCSTRING_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a trimmed Python build: skip, the fingerprint shows the difference
                continue
            take(module)
            for _, obj in sorted(vars(module).items()):
                if getattr(obj, "__module__", None) != module.__name__:
                    continue
                take(obj)
                if inspect.isclass(obj):
                    for _, member in sorted(vars(obj).items()):
                        take(member)
    return tuple(out)


def source_text(kind: str) -> str:
    """The text a haystack of ``kind`` repeats.

    ``"essays"``: Paul Graham's essays (`sources.essays_text`), as in the usual needle plots and RULER;
    ``"docs"``: docstrings of a fixed list of stdlib modules, collected in a deterministic order (their
    wording varies a little across Python versions, so rows record `Haystack.fingerprint`);
    ``"filler"``: one repeated sentence group, the classic pass-key filler; ``"noise"``: that group as
    lines, needles on lines of their own (RULER's "noise" haystack).
    """
    if kind == "docs":
        return "\n\n".join(stdlib_docstrings())
    if kind == "filler":
        return " ".join([FILLER] * 64)
    if kind == "noise":
        return "".join([FILLER + "\n"] * 64)
    if kind == "essays":
        from reattention_core.evaluation.sources import essays_text

        return essays_text()
    raise InvalidInputError(f"unknown haystack kind {kind!r}; choose one of {HAYSTACK_KINDS}")


def split_pieces(text: str) -> list[str]:
    """Sentences of ``text``, each keeping the whitespace before it (so ``"".join`` restores the text)."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        pieces.append(text[start : m.start()])
        start = m.start()
    pieces.append(text[start:])
    return [p for p in pieces if p]


class Haystack:
    """Text of ``kind`` measured in the tokens of ``tokenizer``, cut and filled with needles.

    Pieces are sentences (lines for ``"noise"``), each with its leading whitespace and tokenized on
    its own; the haystack is their concatenation, so a cut at a piece boundary never splits a word.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``).
        kind: one of `HAYSTACK_KINDS`.
    """

    def __init__(self, tokenizer: Any, kind: str = "docs") -> None:
        self.kind = kind
        text = source_text(kind)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:12]
        self._lines = kind == "noise"
        if self._lines:
            self._pieces = text.splitlines(keepends=True)
        else:
            # One pass of the source; later passes reuse its pieces. A separator between passes keeps
            # the last sentence of one pass from running into the first of the next.
            self._pieces = split_pieces(text)
            self._pieces[0] = "\n\n" + self._pieces[0].lstrip()
        self._ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self._pieces]
        self._tokenizer = tokenizer
        counts = [len(i) for i in self._ids]
        self._cum = [0]
        for c in counts:
            self._cum.append(self._cum[-1] + c)
        self.tokens_per_pass = self._cum[-1]
        if self.tokens_per_pass == 0:
            raise InvalidInputError(f"the {kind!r} haystack text tokenized to nothing")

    def _boundary(self, target: int) -> int:
        """The piece boundary (a token offset) nearest to ``target``, over repeated passes."""
        passes, rest = divmod(target, self.tokens_per_pass)
        i = bisect.bisect_left(self._cum, rest)
        best = min((j for j in (i - 1, i) if 0 <= j < len(self._cum)), key=lambda j: abs(self._cum[j] - rest))
        return passes * self.tokens_per_pass + self._cum[best]

    def _text(self, start: int, stop: int) -> str:
        """Text of tokens ``[start, stop)`` of the repeated source; ``start`` must be a boundary."""
        out: list[str] = []
        pos = start
        while pos < stop:
            passes, rest = divmod(pos, self.tokens_per_pass)
            i = bisect.bisect_right(self._cum, rest) - 1
            take = stop - pos
            piece_len = self._cum[i + 1] - self._cum[i]
            offset = rest - self._cum[i]
            if offset == 0 and take >= piece_len:
                out.append(self._pieces[i])
                pos += piece_len
            else:  # a partial piece: decode its tokens (only at the very end of the haystack)
                ids = self._ids[i][offset : offset + take]
                out.append(self._tokenizer.decode(ids, skip_special_tokens=True))
                pos += len(ids)
        return "".join(out)

    def build(self, tokens: int, needles: Sequence[tuple[float, str]] = ()) -> str:
        """About ``tokens`` tokens of haystack with each ``(depth, text)`` needle inserted.

        A needle goes at the piece boundary nearest to ``depth * tokens`` (``depth`` in [0, 1]);
        needles at the same boundary keep their given order. Needle tokens come on top of
        ``tokens`` (callers correct the total, see `fit_prompt`).
        """
        if tokens < 0:
            raise InvalidInputError(f"tokens must be >= 0, got {tokens}")
        cuts = []
        for order, (depth, text) in enumerate(needles):
            if not 0.0 <= depth <= 1.0:
                raise InvalidInputError(f"needle depth must be in [0, 1], got {depth}")
            cuts.append((min(self._boundary(round(depth * tokens)), tokens), order, text))
        cuts.sort()
        out, pos = [], 0
        for at, _, text in cuts:
            out.append(self._text(pos, at))
            out.append(text.strip() + "\n" if self._lines else " " + text.strip())
            pos = at
        out.append(self._text(pos, tokens))
        return "".join(out).strip() if self._lines else "".join(out).lstrip()


def fit_prompt(
    render: Callable[[int], str], count: Callable[[str], int], target: int, overhead: int = 0, tries: int = 4
) -> tuple[int, str, int]:
    """Find a haystack budget whose rendered prompt has ``target`` tokens (or the closest seen).

    Args:
        render: ``budget -> prompt text`` (a haystack of ``budget`` tokens inside the prompt).
        count: ``prompt text -> token count`` as the engine will see it.
        target: wanted prompt length in tokens.
        overhead: tokens of the prompt with an empty haystack (the first guess is the rest).

    Returns:
        (budget, prompt, tokens): the haystack budget used, the prompt and its exact token count.
    """
    budget = max(0, target - overhead)
    best: tuple[int, int, str, int] | None = None
    for _ in range(tries):
        prompt = render(budget)
        n = count(prompt)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), budget, prompt, n)
        if n == target:
            break
        budget = max(0, budget + (target - n))
    # The correction can oscillate when a needle hops to the next sentence boundary: look around.
    for budget in (best[1] + d for d in (-2, -1, 1, 2)) if best and best[0] else ():
        prompt = render(max(0, budget))
        n = count(prompt)
        assert best is not None  # the loop above ran at least once
        if abs(n - target) < best[0]:
            best = (abs(n - target), max(0, budget), prompt, n)
    assert best is not None
    return best[1], best[2], best[3]
