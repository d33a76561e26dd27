"""A generated corpus of facts about fictional people and companies, with questions over it.

Names are synthetic, so the model cannot answer from memory. Each person works for a company and
lives in a city; each company is headquartered in a city, makes a product and was founded in a
year. Facts are shuffled into short numbered records, so the facts a question needs sit in
different records:

* single-fact: "Which company does P work for?", "In which city does P live?"
* multi-fact (two hops): "In which city is the company that P works for headquartered?",
  "What does the company that P works for make?"
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from reattention_core.errors import InvalidInputError
from reattention_core.evaluation.tasks import unique_words

PRODUCTS = (
    "bicycles", "umbrellas", "telescopes", "violins", "lanterns", "kayaks", "typewriters", "hammocks", "compasses",
    "teapots", "skateboards", "microscopes", "harmonicas", "snowshoes", "sundials", "kites", "accordions", "barometers",
)
_SUFFIXES = ("Industries", "Labs", "Works", "Systems", "Holdings", "Partners")
FACTS_PER_RECORD = 4


@dataclass(frozen=True)
class Question:
    """A question, its accepted answer, and the records holding the facts it needs."""

    text: str
    answer: str
    kind: str  # "single" or "multi"
    support: tuple[int, ...]


@dataclass(frozen=True)
class FactCorpus:
    """Records (``"Record 12: fact. fact. ..."``) and the questions drawn over them."""

    records: tuple[str, ...]
    questions: tuple[Question, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.records)


def _name(rng: random.Random, used: set[str]) -> str:
    return " ".join(w.capitalize() for w in unique_words(rng, 2, syllables=rng.choice((2, 3)), exclude=tuple(used)))


def make_corpus(n_people: int, n_questions: int, seed: int) -> FactCorpus:
    """A corpus about ``n_people`` people (a third as many companies and cities) and its questions.

    Half of the questions (rounded up) are single-fact, the rest multi-fact; each is about a
    different person, drawn with ``seed``.
    """
    if n_people < 3:
        raise InvalidInputError(f"a fact corpus needs at least 3 people, got {n_people}")
    if n_questions < 1 or n_questions > n_people:
        raise InvalidInputError(f"questions must be between 1 and the number of people ({n_people}), got {n_questions}")
    rng = random.Random(seed)
    used: set[str] = set()
    n_org = max(2, n_people // 3)
    cities = [w.capitalize() for w in unique_words(rng, n_org + 1, syllables=3)]
    used.update(c.lower() for c in cities)
    companies = []
    for _ in range(n_org):
        (w,) = unique_words(rng, 1, syllables=2, exclude=tuple(used))
        used.add(w)
        companies.append(f"{w.capitalize()} {rng.choice(_SUFFIXES)}")
    people = []
    for _ in range(n_people):
        name = _name(rng, used)
        used.update(name.lower().split())
        people.append(name)
    hq = {c: rng.choice(cities) for c in companies}
    product = {c: rng.choice(PRODUCTS) for c in companies}
    employer = {p: rng.choice(companies) for p in people}
    home = {p: rng.choice(cities) for p in people}

    facts: list[tuple[str, str]] = []  # (fact id, sentence)
    for c in companies:
        facts.append((f"hq:{c}", f"{c} is headquartered in the city of {hq[c]}."))
        facts.append((f"product:{c}", f"{c} makes {product[c]}."))
        facts.append((f"founded:{c}", f"{c} was founded in {rng.randint(1890, 2015)}."))
    for p in people:
        facts.append((f"employer:{p}", f"{p} works for {employer[p]}."))
        facts.append((f"home:{p}", f"{p} lives in {home[p]}."))
    rng.shuffle(facts)
    records, where = [], {}
    for start in range(0, len(facts), FACTS_PER_RECORD):
        chunk = facts[start : start + FACTS_PER_RECORD]
        i = len(records)
        records.append(f"Record {i + 1}: " + " ".join(s for _, s in chunk))
        where.update({fid: i for fid, _ in chunk})

    chosen = rng.sample(people, n_questions)
    n_single = (n_questions + 1) // 2
    questions = []
    for j, p in enumerate(chosen):
        c = employer[p]
        if j < n_single:
            if j % 2 == 0:
                q = Question(f"Which company does {p} work for?", c, "single", (where[f"employer:{p}"],))
            else:
                q = Question(f"In which city does {p} live?", home[p], "single", (where[f"home:{p}"],))
        elif j % 2 == 0 and hq[c] != home[p]:  # otherwise the one-hop answer would also score
            q = Question(f"In which city is the company that {p} works for headquartered?", hq[c], "multi",
                         (where[f"employer:{p}"], where[f"hq:{c}"]))
        else:
            q = Question(f"What does the company that {p} works for make?", product[c], "multi",
                         (where[f"employer:{p}"], where[f"product:{c}"]))
        questions.append(q)
    return FactCorpus(tuple(records), tuple(questions))


def corpus_of_size(
    tokens: int, n_questions: int, seed: int, count: Callable[[str], int]
) -> tuple[FactCorpus, int]:
    """A corpus of about ``tokens`` tokens (people scaled to fit, measured with ``count``).

    Returns:
        (corpus, its token count).
    """
    n = max(3, n_questions, tokens // 40)
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
