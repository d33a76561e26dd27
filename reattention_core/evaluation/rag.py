"""Retrieval-augmented generation for the corpus-QA baseline: BM25 inside a LangChain chain.

`BM25Retriever` returns the top passages for the question; they become the context of the same prompt
the in-context modes build, and the same engine continues it (`rag_chain`). Only ``langchain-core`` is
used, not this package's LangChain adapter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from reattention_core.errors import InvalidInputError

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "the",
        "of",
        "in",
        "is",
        "to",
        "for",
        "does",
        "do",
        "what",
        "which",
        "who",
        "that",
        "with",
        "by",
        "on",
        "at",
        "was",
    ]
)


def bm25_tokens(text: str) -> list[str]:
    """Lower-case word tokens without possessives and a few stop words."""
    return [w for w in _WORD.findall(text.lower().replace("'s", "")) if w not in _STOP]


def _require() -> None:
    try:
        import langchain_core  # noqa: F401
        import rank_bm25  # noqa: F401
    except ImportError as exc:
        raise InvalidInputError(
            f"the rag mode needs langchain-core and rank-bm25 ({exc.name} is missing): "
            "pip install 'reattention[eval]', or leave rag out of --modes"
        ) from exc


def make_retriever(passages: Sequence[str], k: int = 4) -> Any:
    """A `BM25Retriever` over ``passages`` (metadata ``{"id": i}``) returning the top ``k``."""
    _require()
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from pydantic import PrivateAttr
    from rank_bm25 import BM25Okapi

    class BM25Retriever(BaseRetriever):
        """Okapi BM25 over a fixed list of documents; ties go to the earlier document."""

        documents: list[Document]
        k: int = 4
        _index: Any = PrivateAttr(default=None)

        def model_post_init(self, context: Any) -> None:
            self._index = BM25Okapi([bm25_tokens(d.page_content) for d in self.documents])

        def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
            scores = self._index.get_scores(bm25_tokens(query))
            order = sorted(range(len(self.documents)), key=lambda i: (-scores[i], i))
            return [self.documents[i] for i in order[: self.k]]

    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    if not passages:
        raise InvalidInputError("BM25 needs at least one passage to retrieve from")
    docs = [Document(page_content=p, metadata={"id": i}) for i, p in enumerate(passages)]
    return BM25Retriever(documents=docs, k=k)


def text_model(engine: Any, max_new_tokens: int) -> Any:
    """A runnable continuing a prompt text with ``engine``, greedily: the prompt is sent as it is.

    The chain renders the chat template itself (`rag_chain`), so that the prompt can end with an
    answer prefix after the assistant turn start, as the in-context modes' prompts do.
    """
    from langchain_core.runnables import RunnableLambda

    def continue_text(prompt: str) -> str:
        return engine.generate(prompt, max_new_tokens=max_new_tokens, progress=False).text

    return RunnableLambda(continue_text, name="engine.generate")


def rag_chain(retriever: Any, model: Any, render: Callable[[str, str, str], str]) -> Any:
    """``{"context": question | retriever | join, ...} | render | model | StrOutputParser()``.

    Input: ``{"question": ..., "answer_prefix": ...}``. The records are retrieved by the question
    alone; ``render(context, question, answer_prefix)`` makes the prompt text (the same function
    the in-context modes use, so the modes differ only in their context).
    """
    from operator import itemgetter

    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableLambda

    def join(docs: list[Any]) -> str:
        return "\n\n".join(d.page_content for d in docs)

    def prompt(d: dict[str, str]) -> str:
        return render(d["context"], d["question"], d["answer_prefix"])

    inputs = {
        "context": itemgetter("question") | retriever | RunnableLambda(join),
        "question": itemgetter("question"),
        "answer_prefix": itemgetter("answer_prefix"),
    }
    return inputs | RunnableLambda(prompt) | model | StrOutputParser()
