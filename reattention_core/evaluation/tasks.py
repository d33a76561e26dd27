"""Synthetic long-context tasks, generated locally from seeds: a registry and the sample builder.

A sample depends only on ``(base seed, task, length, depth, index)``, never on the mode or the rest of
the grid, so every mode sees the same prompts and a grid can grow without changing samples already
run. Tasks: ``passkey``, ``niah`` (Kamradt's) and RULER's (`reattention_core.evaluation.ruler`), in
`TASK_REGISTRY`; the old names ``multikey``, ``multivalue``, ``vartrack`` remain as aliases.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from reattention_core.errors import InvalidInputError
from reattention_core.evaluation import ruler
from reattention_core.evaluation.haystack import Haystack, fit_prompt
from reattention_core.evaluation.ruler import TaskSpec
from reattention_core.evaluation.scoring import score


@dataclass(frozen=True)
class Task:
    """A task of the registry.

    ``make(rng, depth, tokenizer, length) -> TaskSpec``; ``haystack``: the text haystack its needles
    go into by default (a `HAYSTACK_KINDS` name), or, with ``generated``, a label for the haystack
    the task generates itself; ``depthless``: one cell per length, no depth; ``max_new_tokens``:
    enough for a full answer (decoding dominates short prompts).
    """

    name: str
    make: Callable[[random.Random, Any, Any, int], TaskSpec]  # depth: a float, None for depthless tasks
    haystack: str
    max_new_tokens: int
    depthless: bool = False
    generated: bool = False


def spec_passkey(rng: random.Random, depth: float, tokenizer: Any = None, length: int = 0) -> TaskSpec:
    key = str(rng.randint(10_000, 99_999))
    return TaskSpec(
        before="There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n",
        after="\n\nWhat is the pass key?",
        answer_prefix="The pass key is",
        expected=(key,),
        needles=((depth, f"The pass key is {key}. Remember it. {key} is the pass key."),),
    )


NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."


def spec_niah(rng: random.Random, depth: float, tokenizer: Any = None, length: int = 0) -> TaskSpec:
    """Kamradt's needle-in-a-haystack: one fixed needle, so samples differ only in where it sits."""
    return TaskSpec(
        before="",
        after="\n\nWhat is the best thing to do in San Francisco? Don't give information outside the document or "
        "repeat your findings",
        answer_prefix="",
        expected=("sandwich", "Dolores Park"),
        needles=((depth, NIAH_NEEDLE),),
        system="You are a helpful AI bot that answers questions for a user. Keep your response short and direct",
    )


def _niah(name: str) -> Callable[[random.Random, Any, Any, int], TaskSpec]:
    return lambda rng, depth, tokenizer, length: ruler.spec_niah(name, rng, depth, tokenizer)


def _tasks() -> dict[str, Task]:
    out = {
        "passkey": Task("passkey", spec_passkey, "docs", 12),
        "niah": Task("niah", spec_niah, "essays", 48),
    }
    for name, v in ruler.NIAH_VARIANTS.items():
        per_value = 32 if v.value == "uuids" else 16
        out[name] = Task(name, _niah(name), v.haystack, 8 + per_value * v.values * v.queries,
                         generated=v.haystack == "needles")  # fmt: skip
    out["vt"] = Task("vt", lambda rng, depth, tokenizer, length: ruler.spec_vt(rng, depth), "noise", 32)
    out["cwe"] = Task("cwe", lambda rng, depth, tokenizer, length: ruler.spec_cwe(rng, tokenizer, length), "words", 96,
                      depthless=True, generated=True)  # fmt: skip
    return out


TASK_REGISTRY: dict[str, Task] = _tasks()
TASKS: tuple[str, ...] = tuple(TASK_REGISTRY)
RULER_TASKS: tuple[str, ...] = (*ruler.NIAH_VARIANTS, "vt", "cwe")
# The own-format task names before RULER's formats: they run RULER's tasks now.
ALIASES: dict[str, str] = {"multikey": "niah_multikey_1", "multivalue": "niah_multivalue", "vartrack": "vt"}
# Tasks whose haystack does not depend on a depth (one column in the heat map).
DEPTHLESS: frozenset[str] = frozenset(n for n, t in TASK_REGISTRY.items() if t.depthless)


def get_task(name: str) -> Task:
    """The registry's task for ``name`` (aliases resolved); `InvalidInputError` for unknown names."""
    name = ALIASES.get(name, name)
    if name not in TASK_REGISTRY:
        raise InvalidInputError(f"unknown task {name!r}; choose one of {TASKS} (or {tuple(ALIASES)})")
    return TASK_REGISTRY[name]


def haystack_kind(name: str, requested: str | None = None) -> str:
    """The haystack task ``name`` runs on: ``requested`` where it takes a text haystack, else its own
    (a `HAYSTACK_KINDS` name, or the label of the haystack it generates)."""
    t = get_task(name)
    return t.haystack if t.generated or requested is None else requested


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
    task = ALIASES.get(task, task)
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
    haystack: Haystack | None,
    length: int,
    depth: float | None,
    index: int,
    base_seed: int = 0,
    *,
    jitter: float = 0.0,
) -> Sample:
    """The sample at these coordinates, with a prompt of ``length`` tokens (exact where possible).

    The prompt is the task's text around the haystack (with its needles) in one user message (after
    the task's system message, if any); the haystack budget is corrected until the rendered prompt
    has ``length`` tokens (to within a few tokens when no cut gives the exact count). ``haystack``
    is the text the needles go into (`haystack_kind` says which); ``None`` for tasks that generate
    their own.

    ``jitter``: move the (first) needle by a seeded offset drawn uniformly from ``[-jitter,
    jitter]`` around ``depth`` (clipped to [0, 1]), so the samples of one cell sit at different
    places of the haystack rather than only holding different keys. The needle's text (the key)
    is the same as without jitter.
    """
    t = get_task(task)
    if t.depthless:
        depth = None
    elif depth is None:
        raise InvalidInputError(f"task {t.name!r} needs a depth in [0, 1]")
    if not 0.0 <= jitter <= 0.5:
        raise InvalidInputError(f"jitter must be in [0, 0.5], got {jitter}")
    seed = sample_seed(base_seed, t.name, length, depth, index)
    needle_depth = placed_depth(t.name, length, depth, index, base_seed, jitter=jitter)
    spec = t.make(random.Random(seed), needle_depth, tokenizer, length)
    if spec.body is None and haystack is None:
        raise InvalidInputError(f"task {t.name!r} needs a Haystack (kind {t.haystack!r} by default)")

    def messages_for(budget: int) -> list[dict[str, str]]:
        if spec.body is not None:
            text = spec.body(budget)
        else:
            assert haystack is not None  # checked above
            text = haystack.build(budget, spec.needles)
        system = [{"role": "system", "content": spec.system}] if spec.system else []
        return [*system, {"role": "user", "content": spec.before + text + spec.after}]

    def count(prompt: str) -> int:
        return len(tokenizer(prompt)["input_ids"])

    overhead = count(render(tokenizer, messages_for(0), spec.answer_prefix))
    budget, prompt, n = fit_prompt(
        lambda b: render(tokenizer, messages_for(b), spec.answer_prefix), count, length, overhead
    )
    return Sample(
        task=t.name,
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
