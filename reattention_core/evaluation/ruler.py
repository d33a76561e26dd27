"""RULER's synthetic tasks (Hsieh et al. 2024) in RULER's formats, drawn from seeds.

Needle retrieval (`spec_niah`, the variants of `NIAH_VARIANTS` as RULER's ``synthetic.yaml`` has them),
variable tracking (`spec_vt`) and common-word extraction (`spec_cwe`). Instructions, questions and
answer prefixes are RULER's; differences are noted where they arise.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reattention_core.errors import InvalidInputError
from reattention_core.evaluation.sources import common_words, key_parts


@dataclass(frozen=True)
class TaskSpec:
    """What a task draws for one sample, before its haystack is sized.

    The user message is ``before + haystack + after``, where the haystack is ``body(budget)`` for
    tasks that generate their own, else a `Haystack` of ``budget`` tokens with ``needles`` (``(depth,
    text)`` pairs) inserted. The model continues ``answer_prefix`` after the assistant turn starts;
    a correct answer contains every string of ``expected``.
    """

    before: str
    after: str
    answer_prefix: str
    expected: tuple[str, ...]
    needles: tuple[tuple[float, str], ...] = ()
    body: Callable[[int], str] | None = None
    system: str | None = None


@dataclass(frozen=True)
class NiahVariant:
    """One of RULER's needle tasks: its haystack, what keys and values are, and how many of each."""

    haystack: str  # "essays", "noise" (text haystacks) or "needles" (a haystack of other needles)
    key: str = "words"  # words | uuids
    value: str = "numbers"  # numbers | uuids
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH_VARIANTS: dict[str, NiahVariant] = {
    "niah_single_1": NiahVariant("noise"),
    "niah_single_2": NiahVariant("essays"),
    "niah_single_3": NiahVariant("essays", value="uuids"),
    "niah_multikey_1": NiahVariant("essays", keys=4),
    "niah_multikey_2": NiahVariant("needles"),
    "niah_multikey_3": NiahVariant("needles", key="uuids", value="uuids"),
    "niah_multivalue": NiahVariant("essays", values=4),
    "niah_multiquery": NiahVariant("essays", keys=4, queries=4),
}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def draw(rng: random.Random, kind: str) -> str:
    """A key or value as RULER draws it: a 7-digit number, an ``adjective-noun`` word pair or a UUID4."""
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        adjectives, nouns = key_parts()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise InvalidInputError(f"unknown needle kind {kind!r}")


def _distinct(rng: random.Random, kind: str, n: int, exclude: set[str] | None = None) -> list[str]:
    seen = set(exclude or ())
    out: list[str] = []
    while len(out) < n:
        x = draw(rng, kind)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def needle_text(value_kind: str, key: str, value: str) -> str:
    return f"One of the special magic {value_kind} for {key} is: {value}."


def _joined(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def niah_texts(value_kind: str, query: str, plural: bool) -> tuple[str, str, str]:
    """``(before, after, answer_prefix)`` of RULER's needle template (singular where one value is asked)."""
    if plural:
        return (
            f"Some special magic {value_kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {value_kind} afterwards.\n",
            f"\nWhat are all the special magic {value_kind} for {query} mentioned in the provided text?",
            f"The special magic {value_kind} for {query} mentioned in the provided text are",
        )
    one = value_kind[:-1]
    return (
        f"A special magic {one} is hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {one} afterwards.\n",
        f"\nWhat is the special magic {one} for {query} mentioned in the provided text?",
        f"The special magic {one} for {query} mentioned in the provided text is",
    )


def line_body(
    tokenizer: Any, seed: int, line: Callable[[random.Random], str], inserts: list[tuple[float, str]]
) -> Callable[[int], str]:
    """``budget -> text``: lines drawn by ``line`` (seeded, the same for every budget), with each
    ``(depth, text)`` of ``inserts`` on a line of its own at that fraction of the lines."""
    probe_rng = random.Random(seed)
    probe = [line(probe_rng) for _ in range(32)]
    per_line = max(1.0, sum(len(tokenizer(p + "\n", add_special_tokens=False)["input_ids"]) for p in probe) / 32)

    def body(budget: int) -> str:
        rng = random.Random(seed)
        n = max(1, int(budget / per_line))
        lines = [line(rng) for _ in range(n)]
        for _order, (depth, text) in sorted(enumerate(inserts), key=lambda x: (x[1][0], x[0]), reverse=True):
            lines.insert(min(n, round(depth * n)), text)
        return "\n".join(lines)

    return body


def spec_niah(name: str, rng: random.Random, depth: float, tokenizer: Any) -> TaskSpec:
    """RULER's ``niah_*``: needles ``One of the special magic {numbers|uuids} for {key} is: {value}.``,
    keys wonderwords ``adjective-noun`` pairs or UUIDs, in essays, noise lines or other needles.
    Unlike RULER's random depths, the first needle sits at ``depth`` (for heat maps), the others at
    seeded random depths; the answer prefix has no leading space."""
    v = NIAH_VARIANTS[name]
    keys = _distinct(rng, v.key, v.keys)
    values = [_distinct(rng, v.value, v.values) for _ in keys]
    queried = rng.sample(range(v.keys), v.queries)
    # the (first) queried key's first value at `depth`, every other needle at a seeded random depth
    order = [(queried[0], 0)] + [(k, j) for k in range(v.keys) for j in range(v.values) if (k, j) != (queried[0], 0)]
    depths = [depth] + [rng.random() for _ in order[1:]]
    needles = tuple((d, needle_text(v.value, keys[k], values[k][j])) for d, (k, j) in zip(depths, order, strict=True))
    query = _joined([keys[k] for k in queried])
    before, after, prefix = niah_texts(v.value, query, plural=v.queries * v.values > 1)
    expected = tuple(x for k in queried for x in values[k])
    if v.haystack != "needles":
        return TaskSpec(before, after, prefix, expected, needles=needles)
    # RULER's "needle" haystack: every line another needle, with keys and values of its own
    taken = set(keys) | {x for vs in values for x in vs}
    seed = rng.getrandbits(63)

    def distractor(r: random.Random) -> str:
        k, val = draw(r, v.key), draw(r, v.value)
        while k in taken or val in taken:
            k, val = draw(r, v.key), draw(r, v.value)
        return needle_text(v.value, k, val)

    return TaskSpec(before, after, prefix, expected, body=line_body(tokenizer, seed, distractor, list(needles)))


VT_BEFORE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_texts(value: str, names: int) -> tuple[str, str]:
    return (
        f"\nQuestion: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, {names} variables are "
        f"assigned the value {value}, they are:",
    )


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99998))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(hops)]
    return names, lines, value


def vt_example(rng: random.Random, hops: int = 4, noise_lines: int = 16) -> str:
    """RULER's one-shot example: a short noise haystack with a chain of 3-letter names, and its answer."""
    names, chain, value = _vt_chain(rng, hops, letters=3)
    lines = [NOISE] * noise_lines
    for i, pos in enumerate(sorted(rng.sample(range(noise_lines), len(chain)))):
        lines.insert(pos + i, chain[i])
    after, prefix = _vt_texts(value, hops + 1)
    return VT_BEFORE + "\n".join(lines) + after + " " + prefix + " " + " ".join(names) + "\n\n"


def spec_vt(rng: random.Random, depth: float, hops: int = 4) -> TaskSpec:
    """RULER's variable tracking: one chain of ``hops`` hops (``VAR ABCDE = 12345``, then ``VAR FGHIJ
    = VAR ABCDE``) in noise lines, after a one-shot example as RULER prepends."""
    example = vt_example(rng, hops)
    names, chain, value = _vt_chain(rng, hops, letters=5)
    # the chain starts at `depth` and runs, in order, towards the end
    depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops))
    after, prefix = _vt_texts(value, hops + 1)
    return TaskSpec(example + VT_BEFORE, after, prefix, tuple(names), needles=tuple(zip(depths, chain, strict=True)))


CWE_BEFORE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_AFTER = "\nQuestion: What are the 10 most common words in the above list?"
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(
    rng: random.Random, pool: list[str], common: int, n_words: int, freq: int, rare: int
) -> tuple[str, list[str]]:
    chosen = rng.sample(pool, min(n_words, len(pool)))
    top, rest = chosen[:common], chosen[common:]
    items = top * freq + rest * rare
    rng.shuffle(items)
    return numbered(items), top


def spec_cwe(rng: random.Random, tokenizer: Any, length: int, common: int = 10) -> TaskSpec:
    """RULER's common-word extraction. Beyond the word pool (about 8K words, reached near 128K tokens
    for most tokenizers) the rare words repeat more often, always fewer times than the common ones.

    A numbered list of words on one line: ``common`` words 30 times each, the rest 3 times (6 and 1
    below 4K tokens), after a one-shot example."""
    pool = list(common_words())
    small = length < 4096
    freq, rare = (6, 1) if small else (30, 3)
    ex_words, ex_freq, ex_rare = (20, 3, 1) if small else (40, 10, 3)
    example_list, example_top = _word_list(rng, pool, common, ex_words, ex_freq, ex_rare)
    example = CWE_BEFORE + example_list + CWE_AFTER + " " + CWE_PREFIX + " " + numbered(example_top) + "\n"
    top = rng.sample(pool, common)
    taken = set(top)
    others = [w for w in pool if w not in taken]
    seed = rng.getrandbits(63)
    probe = numbered(random.Random(seed).sample(others, 64))
    per_entry = max(1.0, len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / 64)

    def body(budget: int) -> str:
        r = random.Random(seed)
        entries = max(common * freq + 1, int(budget / per_entry))
        n_rare = max(1, (entries - common * freq) // rare)
        reps = rare
        if n_rare > len(others):  # more entries than the pool holds at `rare` repeats each
            n_rare = len(others)
            reps = min(freq - 1, max(rare, (entries - common * freq) // n_rare))
        items = top * freq + r.sample(others, n_rare) * reps
        r.shuffle(items)
        return numbered(items)

    return TaskSpec(example + CWE_BEFORE, CWE_AFTER, CWE_PREFIX, tuple(top), body=body)
