"""Read text files and folders into one corpus string, in a stable order.

``reattention ask PATH...`` passes the corpus with ``context=``; the prefix cache reuses it only for
the same tokens, so the rendering is deterministic (`Corpus.text`, `load_corpus`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from reattention_core.errors import CorpusError

# Bytes sniffed for NUL before decoding the whole file.
_SNIFF_BYTES = 8192
HEADER_PREFIX = "### "
DOCUMENT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Document:
    """One text file: ``path`` as displayed in its header line, ``text`` without trailing whitespace."""

    path: str
    text: str

    def render(self) -> str:
        return f"{HEADER_PREFIX}{self.path}\n{self.text}"


@dataclass(frozen=True)
class Corpus:
    """Documents in display-path order, plus what was skipped while walking folders.

    Attributes:
        documents: the text files, sorted by ``path``.
        skipped: display paths of files inside folders that were not text (binary, not UTF-8) or empty.
    """

    documents: tuple[Document, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def text(self) -> str:
        """The corpus as placed in context: each document's header line and text, blank-line separated.

        Each document opens with a header line ``### <display path>``; documents are sorted by that path.
        """
        return DOCUMENT_SEPARATOR.join(d.render() for d in self.documents)

    def __len__(self) -> int:
        return len(self.documents)


def _display(root_arg: str, rel: PurePath | None) -> str:
    """How a file is named in its header: the argument as typed, joined with the path below it."""
    base = PurePath(root_arg)
    return (base / rel).as_posix() if rel is not None else base.as_posix()


def read_text_file(path: Path) -> str:
    """The text of ``path``; `CorpusError` if it is binary (NUL bytes) or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from exc
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise CorpusError(f"{path} is a binary file (it contains NUL bytes); pass text files (.txt, .md, .rst, ...)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); convert it to UTF-8 "
            "(e.g. iconv -t utf-8) or leave it out"
        ) from exc
    return text.removeprefix("\ufeff").rstrip()


def _walk(folder: Path) -> Iterable[Path]:
    """Files below ``folder``, hidden files and folders left out (symlinked folders not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def load_corpus(paths: Sequence[str | os.PathLike[str]]) -> Corpus:
    """Read files and folders (recursively) into a `Corpus`.

    A file is text when its first bytes hold no NUL byte and it decodes as UTF-8. A binary or empty
    file named on the command line is an error; inside a folder it is skipped and counted. Hidden files
    and folders (``.git``, ``.venv``, ...) are skipped when walking a folder.

    Raises:
        CorpusError: no path given, a path that does not exist, a named file that is binary, not
            UTF-8 or empty, or no text at all in the end.
    """
    if not paths:
        raise CorpusError("no documents given; pass one or more text files or folders")
    found: dict[Path, str] = {}  # resolved path -> display path (the same file reached twice is read once)
    skipped: list[str] = []
    for arg in paths:
        arg = os.fspath(arg)
        p = Path(arg).expanduser()
        if not p.exists():
            raise CorpusError(f"{arg}: no such file or folder; check the path (relative paths start at {os.getcwd()})")
        if p.is_dir():
            for f in _walk(p):
                found.setdefault(f.resolve(), _display(arg, f.relative_to(p)))
        else:
            found.setdefault(p.resolve(), _display(arg, None))
    named = {Path(os.fspath(a)).expanduser().resolve() for a in paths}
    docs: list[Document] = []
    for real, shown in sorted(found.items(), key=lambda item: item[1]):
        if real in named:
            text = read_text_file(real)  # errors for a file the user named
            if not text.strip():
                raise CorpusError(f"{shown} is empty; leave it out or add some text")
        else:
            try:
                text = read_text_file(real)
            except CorpusError:
                skipped.append(shown)
                continue
            if not text.strip():
                skipped.append(shown)
                continue
        docs.append(Document(shown, text))
    if not docs:
        where = ", ".join(os.fspath(a) for a in paths)
        extra = f" ({len(skipped)} binary or empty file(s) skipped)" if skipped else ""
        raise CorpusError(f"no text found in {where}{extra}; pass folders holding .txt, .md or .rst files")
    return Corpus(tuple(docs), tuple(skipped))


__all__ = ["Corpus", "Document", "load_corpus", "read_text_file"]
