"""Synthetic long-context tasks: pass key and RULER-style tasks, generated locally from seeds.

Every sample is a function of ``(base seed, task, length, depth, index)`` only, never of the
attention mode or of the rest of the grid, so every mode sees exactly the same prompts and a grid
can be extended later without changing the samples already run.

Tasks (needles follow the RULER templates, Hsieh et al. 2024):

* ``passkey``: one 5-digit key; the prototype's needle and question.
* ``multikey``: four keys with a 7-digit number each; the question asks for one of them (the
  others are distractors). Target at ``depth``, distractors at seeded random depths.
* ``multivalue``: one key with four numbers; the answer must list all four (scored by recall).
  The first at ``depth``, the others at random depths.
* ``vartrack``: variable tracking, ``VAR A = 12345``, ``VAR B = VAR A``, ... five variables;
  the answer must name all five. The chain starts at ``depth`` and runs, in order, towards the end.
* ``cwe``: common-word extraction; the haystack *is* a numbered list of synthetic words, ten of
  which are much more frequent; the answer must name those ten. No depth.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reattention_core.errors import InvalidInputError
from reattention_core.evaluation.haystack import Haystack, fit_prompt
from reattention_core.evaluation.scoring import score

TASKS: tuple[str, ...] = ("passkey", "multikey", "multivalue", "vartrack", "cwe")
RULER_TASKS: tuple[str, ...] = ("multikey", "multivalue", "vartrack", "cwe")
# Tasks whose haystack does not depend on a depth (one column in the heat map).
DEPTHLESS: frozenset[str] = frozenset({"cwe"})

_CONSONANTS = "bdfghklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class TaskSpec:
    """What a task draws for one sample, before the haystack is sized.

    ``body``: for tasks whose haystack is generated (``cwe``): ``budget tokens -> text``.
    """

    instruction: str
    question: str
    answer_prefix: str
    expected: tuple[str, ...]
    needles: tuple[tuple[float, str], ...] = ()
    body: Callable[[int], str] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Sample:
    """One prompt of a task, ready to generate from.

    Attributes:
        prompt: the full prompt text (chat template applied, answer prefix appended); pass it to
            ``engine.generate`` as a plain string.
        messages: the chat messages it was rendered from (without the answer prefix).
        prompt_tokens: tokens of ``prompt`` as the engine encodes it.
        expected: the strings a correct answer contains; `score` is the fraction found.
        needle_depth: where the (first) needle was put: ``depth``, moved by the jitter if any.
    """

    task: str
    length: int
    depth: float | None
    index: int
    seed: int
    messages: tuple[dict[str, str], ...]
    answer_prefix: str
    expected: tuple[str, ...]
    prompt: str
    prompt_tokens: int
    needle_depth: float | None = None

    def score(self, answer: str) -> float:
        return score(answer, self.expected)


def sample_seed(base_seed: int, task: str, length: int, depth: float | None, index: int) -> int:
    """A 63-bit seed derived from the sample's coordinates only (stable across runs and machines)."""
    d = "none" if depth is None else f"{depth:.6f}"
    blob = f"{base_seed}|{task}|{length}|{d}|{index}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def unique_words(rng: random.Random, n: int, syllables: int = 3, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct pronounceable synthetic words (no prior knowledge can help the model)."""
    seen, out = set(exclude), []
    while len(out) < n:
        w = _word(rng, syllables)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _distinct_numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = _number(rng, digits)
        if v not in out:
            out.append(v)
    return out


_MAGIC_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


def spec_passkey(rng: random.Random, depth: float) -> TaskSpec:
    key = _number(rng, 5)
    return TaskSpec(
        instruction="There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.",
        question="What is the pass key?",
        answer_prefix="The pass key is",
        expected=(key,),
        needles=((depth, f"The pass key is {key}. Remember it. {key} is the pass key."),),
    )


def spec_multikey(rng: random.Random, depth: float, keys: int = 4) -> TaskSpec:
    names = unique_words(rng, keys)
    values = _distinct_numbers(rng, keys, 7)
    depths = [depth] + [rng.random() for _ in range(keys - 1)]
    needles = tuple(
        (d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, names, values)
    )
    return TaskSpec(
        instruction=_MAGIC_INTRO,
        question=f"What is the special magic number for {names[0]} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {names[0]} mentioned in the provided text is",
        expected=(values[0],),
        needles=needles,
    )


def spec_multivalue(rng: random.Random, depth: float, values: int = 4) -> TaskSpec:
    (name,) = unique_words(rng, 1)
    nums = _distinct_numbers(rng, values, 7)
    depths = [depth] + [rng.random() for _ in range(values - 1)]
    needles = tuple((d, f"One of the special magic numbers for {name} is: {v}.") for d, v in zip(depths, nums))
    return TaskSpec(
        instruction=_MAGIC_INTRO,
        question=f"What are all the special magic numbers for {name} mentioned in the provided text?",
        answer_prefix=f"The special magic numbers for {name} mentioned in the provided text are",
        expected=tuple(nums),
        needles=needles,
    )


def spec_vartrack(rng: random.Random, depth: float, hops: int = 4) -> TaskSpec:
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in names:
            names.append(v)
    value = _number(rng, 5)
    depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops))
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    return TaskSpec(
        instruction="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=(
            f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
            f"are assigned the value {value}, they are:"
        ),
        expected=tuple(names),
        needles=tuple(zip(depths, lines)),
    )


def spec_cwe(rng: random.Random, tokenizer: Any, common: int = 10) -> TaskSpec:
    words = unique_words(rng, common, syllables=2)
    list_seed = rng.getrandbits(63)
    probe = [f"{i + 1}. {w}" for i, w in enumerate(unique_words(random.Random(list_seed), 64, exclude=words))]
    per_entry = max(1.0, sum(len(tokenizer(p + "\n", add_special_tokens=False)["input_ids"]) for p in probe) / len(probe))

    def body(budget: int) -> str:
        # The list's composition depends on the budget only; the fit loop calls this a few times.
        r = random.Random(list_seed)
        entries = max(common * 2, int(budget / per_entry))
        freq = max(2, min(30, entries // (common * 3)))  # RULER: 30 for common words, 3 for the rest
        rare_freq = max(1, min(3, freq - 1))
        n_rare = max(0, (entries - common * freq) // rare_freq)
        rare = unique_words(r, n_rare, exclude=words)
        items = [w for w in words for _ in range(freq)] + [w for w in rare for _ in range(rare_freq)]
        r.shuffle(items)
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    return TaskSpec(
        instruction="Below is a numbered list of words. In these words, some appear more often than others.",
        question=f"What are the {common} most common words in the above list?",
        answer_prefix=f"Answer: The top {common} words that appear most often in the list are:",
        expected=tuple(words),
        body=body,
    )


def task_spec(task: str, rng: random.Random, depth: float | None, tokenizer: Any) -> TaskSpec:
    if task == "cwe":
        return spec_cwe(rng, tokenizer)
    if depth is None:
        raise InvalidInputError(f"task {task!r} needs a depth in [0, 1]")
    makers = {"passkey": spec_passkey, "multikey": spec_multikey, "multivalue": spec_multivalue, "vartrack": spec_vartrack}
    if task not in makers:
        raise InvalidInputError(f"unknown task {task!r}; choose one of {TASKS}")
    return makers[task](rng, depth)


def render(tokenizer: Any, messages: Sequence[dict[str, str]], answer_prefix: str) -> str:
    """Chat template with the assistant turn opened, then the answer prefix (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text + answer_prefix
    return "\n\n".join(m["content"] for m in messages) + "\n\n" + answer_prefix


def placed_depth(
    task: str, length: int, depth: float | None, index: int, base_seed: int = 0, *, jitter: float = 0.0
) -> float | None:
    """Where `make_sample` puts the sample's (first) needle: ``depth``, moved by the seeded jitter
    (``None`` for depth-less tasks). Cheap: the runner orders cells by it without building prompts."""
    if task in DEPTHLESS or depth is None:
        return None
    if jitter <= 0:
        return depth
    seed = sample_seed(base_seed, task, length, depth, index)
    # its own stream, so the key and the other needles stay those of the unjittered sample
    moved = depth + random.Random(seed ^ 0x6A177E4).uniform(-jitter, jitter)
    return min(1.0, max(0.0, moved))


def make_sample(
    task: str,
    tokenizer: Any,
    haystack: Haystack,
    length: int,
    depth: float | None,
    index: int,
    base_seed: int = 0,
    *,
    jitter: float = 0.0,
) -> Sample:
    """The sample at these coordinates, with a prompt of ``length`` tokens (exact where possible).

    The prompt is ``instruction + haystack (with needles) + question`` in one user message; the
    haystack budget is corrected until the rendered prompt has ``length`` tokens (to within a
    few tokens when no cut gives the exact count).

    ``jitter``: move the (first) needle by a seeded offset drawn uniformly from ``[-jitter,
    jitter]`` around ``depth`` (clipped to [0, 1]), so the samples of one cell sit at different
    places of the haystack rather than only holding different keys. The needle's text (the key)
    is the same as without jitter.
    """
    if task in DEPTHLESS:
        depth = None
    if not 0.0 <= jitter <= 0.5:
        raise InvalidInputError(f"jitter must be in [0, 0.5], got {jitter}")
    seed = sample_seed(base_seed, task, length, depth, index)
    needle_depth = placed_depth(task, length, depth, index, base_seed, jitter=jitter)
    spec = task_spec(task, random.Random(seed), needle_depth, tokenizer)

    def messages_for(budget: int) -> list[dict[str, str]]:
        text = spec.body(budget) if spec.body is not None else haystack.build(budget, spec.needles)
        return [{"role": "user", "content": f"{spec.instruction}\n\n{text}\n\n{spec.question}"}]

    def count(prompt: str) -> int:
        return len(tokenizer(prompt)["input_ids"])

    overhead = count(render(tokenizer, messages_for(0), spec.answer_prefix))
    budget, prompt, n = fit_prompt(
        lambda b: render(tokenizer, messages_for(b), spec.answer_prefix), count, length, overhead
    )
    return Sample(
        task=task,
        length=length,
        depth=depth,
        index=index,
        seed=seed,
        messages=tuple(messages_for(budget)),
        answer_prefix=spec.answer_prefix,
        expected=spec.expected,
        prompt=prompt,
        prompt_tokens=n,
        needle_depth=needle_depth,
    )
