"""Corpus QA: the whole corpus in context (ReAttention) vs BM25-RAG vs full attention truncated or YaRN.

Every mode gets the same generated corpus (`facts.make_corpus`), questions and prompt (`render_prompt`);
only the context differs (`QAGrid`). A two-step question runs twice over one context and its row scores
the second step (`answer_question`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reattention_core.config import ReAttentionConfig
from reattention_core.errors import InvalidInputError
from reattention_core.evaluation.env import environment
from reattention_core.evaluation.facts import DESIGN, FactCorpus, Question, corpus_of_size, hop_value
from reattention_core.evaluation.results import ResultsFile, cell_key, offload_tag
from reattention_core.evaluation.runner import (
    DEFAULT_YARN_FACTOR,
    RunReport,
    check_overrides,
    mode_config,
    overrides_tag,
)
from reattention_core.evaluation.scoring import found
from reattention_core.evaluation.tasks import render
from reattention_core.prompts import CONTEXT_SEPARATOR

QA_MODES: tuple[str, ...] = ("reattention", "rag", "full-truncated", "yarn")
# Room kept in the window for the chat template, the question, the answer prefixes and the answer
# when truncating.
_TRUNCATION_MARGIN = 200


@dataclass(frozen=True)
class QAGrid:
    """Corpus sizes (tokens) x modes x questions. ``top_k``: records retrieved by ``rag``;
    ``yarn_factor``: the YaRN factor of the ``yarn`` mode; ``overrides``: ReAttention config fields
    to change for the ``reattention`` and ``rag`` modes (`NeedleGrid.overrides`), part of their rows'
    identity.

    Modes: ``reattention`` (the whole corpus; later questions of a size reuse its cached pages),
    ``rag`` (the ``top_k`` BM25 records, `rag.rag_chain`), ``full-truncated`` (full attention over the
    whole records that fit the pre-training window) and ``yarn`` (full attention with YaRN-stretched
    RoPE over the records that fit the stretched window)."""

    sizes: tuple[int, ...]
    modes: tuple[str, ...] = QA_MODES
    questions: int = 12
    seed: int = 0
    top_k: int = 4
    max_new_tokens: int | None = None
    yarn_factor: float = DEFAULT_YARN_FACTOR
    overrides: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 256 for s in self.sizes):
            raise InvalidInputError(f"corpus sizes must be ints >= 256 tokens, got {self.sizes}")
        bad = [m for m in self.modes if m not in QA_MODES]
        if not self.modes or bad:
            raise InvalidInputError(f"QA modes must be among {QA_MODES}, got {self.modes}")
        if self.questions < 1:
            raise InvalidInputError(f"questions must be >= 1, got {self.questions}")
        if self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k}")
        ReAttentionConfig(mode="full", yarn_factor=self.yarn_factor)  # validates the factor
        check_overrides(self.overrides)

    def overrides_for(self, mode: str) -> str | None:
        """The overrides tag of ``mode``'s rows (modes that run ReAttention only)."""
        return overrides_tag(self.overrides) if mode in ("reattention", "rag") else None

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or 24


def truncate_records(records: tuple[str, ...], budget: int, count: Callable[[str], int]) -> tuple[int, str]:
    """The longest run of whole records from the start whose text fits ``budget`` tokens.

    Returns:
        (records kept, their text).
    """
    lo, hi = 0, len(records)
    while lo < hi:  # the largest n with count(first n records) <= budget
        mid = (lo + hi + 1) // 2
        if count("\n\n".join(records[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, "\n\n".join(records[:lo])


def render_prompt(tokenizer: Any, context: str, question: str, answer_prefix: str) -> str:
    """The prompt text of every mode: ``context + "\\n\\n" + question`` as one user message, the
    assistant turn opened, then ``answer_prefix`` (plain text without a chat template)."""
    return render(tokenizer, [{"role": "user", "content": context + CONTEXT_SEPARATOR + question}], answer_prefix)


def answer_question(ask: Callable[[str], str], q: Question) -> tuple[str, dict[str, Any]]:
    """Answer ``q`` with ``ask(answer_prefix) -> continuation`` over one fixed context.

    Returns:
        (the text scored, extra row fields: for a two-step question the first step's text,
        what it named and whether that was the right office).
    """
    first = ask(q.answer_prefix)
    if q.follow_up is None:
        return first, {"answer_prefix": q.answer_prefix}
    hop = hop_value(first)
    prefix = q.follow_up.format(office=hop)
    return ask(prefix), {
        "answer_prefix": prefix,
        "first_step": first,
        "hop": hop,
        "hop_expected": q.hop_answer,
        "hop_correct": hop == q.hop_answer,
    }


def run_qa(
    engine: Any, grid: QAGrid, results: ResultsFile, *, limit: int | None = None, progress: bool = True
) -> RunReport:
    """Answer every (size, mode, question) not yet in ``results``, appending one row each (the file
    is held for the run: a second run on it is refused)."""
    with results.exclusive():
        return _run_qa(engine, grid, results, limit=limit, progress=progress)


def _run_qa(engine: Any, grid: QAGrid, results: ResultsFile, *, limit: int | None, progress: bool) -> RunReport:
    from tqdm.auto import tqdm

    if "rag" in grid.modes:
        from reattention_core.evaluation import rag

        rag._require()  # fail before the first prefill, not after
    env = environment(engine)
    base = engine.config
    tuned = base.replace(**dict(grid.overrides))  # an invalid override fails here, before any question
    report = RunReport()

    def count(text: str) -> int:
        return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ident(size: int, mode: str, index: int) -> dict[str, Any]:
        return {
            "task": "qa",
            "haystack": DESIGN,
            "length": size,
            "depth": None,
            "index": index,
            "mode": mode,
            "seed": grid.seed,
            "model": engine.model_name,
            "offload": offload_tag(engine),
            "yarn_factor": grid.yarn_factor if mode == "yarn" else None,
            "overrides": grid.overrides_for(mode),
        }

    todo = [(s, m, i) for s in grid.sizes for m in grid.modes for i in range(grid.questions)]
    pending = []
    for cell in todo:
        if cell_key(ident(*cell)) in results:
            report.skipped += 1
        else:
            pending.append(cell)
    if limit is not None:
        pending = pending[: max(0, limit)]
    corpora: dict[int, tuple[FactCorpus, int]] = {}
    chains: dict[int, Any] = {}
    bar = tqdm(pending, desc="qa", unit="question", disable=not progress, dynamic_ncols=True)
    try:
        for size, mode, index in bar:
            if size not in corpora:
                corpora.clear()  # one corpus at a time: the sizes run in order
                chains.clear()
                corpora[size] = corpus_of_size(size, grid.questions, grid.seed, count)
            corpus, corpus_tokens = corpora[size]
            q = corpus.questions[index]
            question = q.text
            bar.set_description(f"qa {size} {mode}")
            extra: dict[str, Any] = {}
            t0 = time.perf_counter()
            if mode == "rag":
                from reattention_core.evaluation import rag

                engine.config = mode_config(tuned, "reattention")
                if size not in chains:
                    retriever = rag.make_retriever(corpus.records, grid.top_k)
                    model = rag.text_model(engine, grid.new_tokens)
                    chain = rag.rag_chain(retriever, model, lambda c, qq, a: render_prompt(engine.tokenizer, c, qq, a))
                    chains[size] = (retriever, chain, f"langchain:{type(model).__name__}")
                retriever, chain, pipeline = chains[size]
                got = [d.metadata["id"] for d in retriever.invoke(question)]

                def ask_chain(prefix: str, chain: Any = chain, question: str = question) -> str:
                    return chain.invoke({"question": question, "answer_prefix": prefix})

                answer, steps = answer_question(ask_chain, q)
                extra = {
                    "retrieved": got,
                    "support_in_context": sum(s in got for s in q.support) / len(q.support),
                    "pipeline": pipeline,
                    **steps,
                }
                prompt_tokens = cached = None
            else:
                if mode in ("full-truncated", "yarn"):
                    engine.config = mode_config(base, "full" if mode == "full-truncated" else "yarn", grid.yarn_factor)
                    window = engine.config.window_for(engine.window)
                    kept, context = truncate_records(
                        corpus.records, window - _TRUNCATION_MARGIN - grid.new_tokens, count
                    )
                    extra = {
                        "records_in_context": kept,
                        "support_in_context": sum(s < kept for s in q.support) / len(q.support),
                    }
                else:
                    engine.config = mode_config(tuned, "reattention")
                    context = corpus.text
                    extra = {"support_in_context": 1.0}
                if not context:
                    raise InvalidInputError("the window is too small to hold a single record")
                results_of: list[Any] = []

                def ask(
                    prefix: str, context: str = context, question: str = question, results_of: list[Any] = results_of
                ) -> str:
                    prompt = render_prompt(engine.tokenizer, context, question, prefix)
                    res = engine.generate(prompt, max_new_tokens=grid.new_tokens, progress=False)
                    results_of.append(res)
                    return res.text

                answer, steps = answer_question(ask, q)
                extra.update(steps)
                # those of the scored (last) step
                prompt_tokens, cached = results_of[-1].prompt_tokens, results_of[-1].cached_tokens
            seconds = time.perf_counter() - t0
            hits = found(answer, (q.answer,))
            row = {
                **ident(size, mode, index),
                "kind": q.kind,
                "corpus_tokens": corpus_tokens,
                "records": len(corpus.records),
                "question": q.text,
                "expected": [q.answer],
                "answer": answer,
                "found": hits,
                "score": float(bool(hits)),
                "hit": bool(hits),
                "seconds": round(seconds, 3),
                "prompt_tokens": prompt_tokens,
                "cached_tokens": cached,
                **extra,
                "config": engine.config.to_dict(),
                "env": env,
            }
            results.append(row)
            report.ran += 1
            report.rows.append(row)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        engine.config = base
        bar.close()
    return report
