"""A generated corpus of facts about fictional people and offices, with questions over it.

Names and numbers are synthetic, so the model cannot answer from memory; each fact follows its subject's
name, so an answer prefix repeating the record's words points at the answer (`make_corpus`). Why this
design: `docs/design-notes.md`, "Evaluation".
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reattention_core.errors import InvalidInputError

# Identifies this task design in result rows (the ``haystack`` of a QA row), so that rows of the
# earlier design ("facts": people and companies, four mixed facts per record, no answer prefix)
# never count as cells of this one.
DESIGN = "facts-v2"
_NUMBER = re.compile(r"\d+")
_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


def unique_words(rng: random.Random, n: int, syllables: int = 3, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct pronounceable synthetic words (no prior knowledge can help the model)."""
    seen, out = set(exclude), list[str]()
    while len(out) < n:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class Question:
    """A question, its accepted answer, the records holding the facts it needs, and its prefixes.

    ``answer_prefix``: the text the answer starts with (put after the assistant turn start).
    ``follow_up``: for a two-step question, the prefix of its second step, with ``{office}`` for
    what the first step named (`hop_value`); ``hop_answer``: the correct first-step value.
    """

    text: str
    answer: str
    kind: str  # "single" or "multi"
    support: tuple[int, ...]
    answer_prefix: str
    follow_up: str | None = None
    hop_answer: str | None = None


@dataclass(frozen=True)
class FactCorpus:
    """Records (``"Record 12: ..."``) and the questions drawn over them."""

    records: tuple[str, ...]
    questions: tuple[Question, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.records)


def hop_value(text: str) -> str:
    """What a first step named: its first number, else its first word (``""`` if none)."""
    m = _NUMBER.search(text or "")
    if m:
        return m.group(0)
    words = re.findall(r"[^\s,.;:]+", text or "")
    return words[0] if words else ""


def _name(rng: random.Random, used: set[str]) -> str:
    return " ".join(w.capitalize() for w in unique_words(rng, 2, syllables=rng.choice((2, 3)), exclude=tuple(used)))


def _distinct(rng: random.Random, n: int, digits: int) -> list[int]:
    return rng.sample(range(10 ** (digits - 1), 10**digits), n)


def make_corpus(n_people: int, n_questions: int, seed: int) -> FactCorpus:
    """A corpus about ``n_people`` people (a third as many offices) and its questions.

    Records, one per person or office, in shuffled order: ``Record 12: Tedoli Gatepe, office 4821,
    lives in Sazimu.`` and ``Record 31: Office 4821, door code 61250, is on floor 4.`` Single-fact
    questions alternate between a person's office (prefix ``"P, office"``) and an office's door code
    (prefix ``"Office N, door code"``). A multi-fact question asks for the door code of P's office; the
    office's record is not findable from its words, so it is answered in two steps over one context:
    ``"P, office"``, then `Question.follow_up` with the office the model named.

    Half of the questions (rounded up) are single-fact, the rest multi-fact; each is about a
    different person, drawn with ``seed``.
    """
    if n_people < 3:
        raise InvalidInputError(f"a fact corpus needs at least 3 people, got {n_people}")
    if n_questions < 1 or n_questions > n_people:
        raise InvalidInputError(f"questions must be between 1 and the number of people ({n_people}), got {n_questions}")
    rng = random.Random(seed)
    n_office = max(2, n_people // 3)
    digits = 4 if n_office <= 4000 else 5  # office numbers; door codes have one digit more
    cities = [w.capitalize() for w in unique_words(rng, max(3, n_office // 2), syllables=3)]
    used = {c.lower() for c in cities}
    people = []
    for _ in range(n_people):
        name = _name(rng, used)
        used.update(name.lower().split())
        people.append(name)
    offices = _distinct(rng, n_office, digits)
    code = dict(zip(offices, _distinct(rng, n_office, digits + 1), strict=True))
    office = {p: rng.choice(offices) for p in people}
    home = {p: rng.choice(cities) for p in people}

    entities: list[str | int] = [*people, *offices]
    rng.shuffle(entities)
    records, where = [], {}
    for i, x in enumerate(entities):
        if isinstance(x, str):
            fact = f"{x}, office {office[x]}, lives in {home[x]}."
        else:
            fact = f"Office {x}, door code {code[x]}, is on floor {rng.randint(1, 9)}."
        records.append(f"Record {i + 1}: {fact}")
        where[x] = i

    chosen = rng.sample(people, n_questions)
    n_single = (n_questions + 1) // 2
    questions = []
    for j, p in enumerate(chosen):
        o = office[p]
        if j < n_single and j % 2 == 0:
            q = Question(f"Which office does {p} work in?", str(o), "single", (where[p],), f"{p}, office")
        elif j < n_single:
            q = Question(
                f"What is the door code of office {o}?", str(code[o]), "single", (where[o],), f"Office {o}, door code"
            )
        else:
            q = Question(
                f"What is the door code of the office that {p} works in?",
                str(code[o]),
                "multi",
                (where[p], where[o]),
                f"{p}, office",
                follow_up=f"{p}, office {{office}}. Office {{office}}, door code",
                hop_answer=str(o),
            )
        questions.append(q)
    return FactCorpus(tuple(records), tuple(questions))


def corpus_of_size(tokens: int, n_questions: int, seed: int, count: Callable[[str], int]) -> tuple[FactCorpus, int]:
    """A corpus of about ``tokens`` tokens (people scaled to fit, measured with ``count``).

    Returns:
        (corpus, its token count).
    """
    n = max(3, n_questions, tokens // 25)
    best: tuple[int, FactCorpus, int] | None = None
    for _ in range(4):
        corpus = make_corpus(n, n_questions, seed)
        got = count(corpus.text)
        if best is None or abs(got - tokens) < best[0]:
            best = (abs(got - tokens), corpus, got)
        if abs(got - tokens) <= 0.02 * tokens:
            break
        n = max(3, n_questions, round(n * tokens / max(1, got)))
    assert best is not None
    return best[1], best[2]
