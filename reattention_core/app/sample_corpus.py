"""A sample corpus built at run time from text every machine has: Python standard library docstrings.

``reattention sample-corpus DIR`` writes one markdown file per module (the module docstring, then
the docstrings of its public functions and classes), so ``reattention ask DIR -q ...`` has
something real to read without a download. The text depends on the Python version, never on
anything random, so a second run over the same folder reuses the prefix cache.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path

from reattention_core.errors import CorpusError

# About 8K tokens (SmolLM2 tokenizer, Python 3.12): small enough to prefill on a CPU.
DEFAULT_MODULES: tuple[str, ...] = ("bisect", "csv", "fnmatch", "functools", "heapq", "json", "string", "textwrap")
# A question whose answer is in the sample corpus (bisect.md, the first document, about 7K tokens
# before the question) and which the embedded SmolLM2-135M answers from it, e.g. "The
# bisect.bisect_left function returns the index where to insert item x in list a, assuming a is
# sorted." Without the corpus it answers nothing. The exact wording of a greedy answer from a
# 135M model moves with float rounding (CPU thread count, prefill chunk schedule): runs also gave
# "... returns the index of the most recently inserted item". The check is therefore the two words
# of the docstring's answer that every run kept. "What does bisect.insort do?" lost even those
# with one thread. Harder questions (which modules the json API resembles, the ECMA-262 edition)
# were answered wrongly: a 135M model mostly talks about the last document it read.
SAMPLE_QUESTION = "What does bisect.bisect_left return?"
SAMPLE_ANSWER_WORDS = ("index", "insert")


def module_document(name: str) -> str:
    """Markdown text of module ``name``: its docstring, then one section per public function or class."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise CorpusError(f"cannot import the standard library module {name!r} ({exc}); pick another") from exc
    parts = [f"# The {name} module", inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # Only what the module defines (its C accelerator `_name` included), not what it imports.
        if getattr(obj, "__module__", None) not in (name, f"_{name}"):
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"## {name}.{attr}\n{doc}")
    return "\n\n".join(p for p in parts if p).strip() + "\n"


def write_sample_corpus(directory: str | Path, modules: Sequence[str] = DEFAULT_MODULES) -> list[Path]:
    """Write ``<module>.md`` for each module into ``directory`` (created); returns the files in order."""
    if not modules:
        raise CorpusError("no modules given for the sample corpus; name at least one, e.g. json")
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in modules:
        path = out / f"{name}.md"
        path.write_text(module_document(name), encoding="utf-8")
        written.append(path)
    return written


__all__ = ["DEFAULT_MODULES", "SAMPLE_ANSWER_WORDS", "SAMPLE_QUESTION", "module_document", "write_sample_corpus"]
