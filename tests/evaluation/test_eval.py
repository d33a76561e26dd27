"""The evaluation harness: samples, scoring, the resumable grid runner, corpus QA, reports, CLI.

Machinery runs on a tiny random-init Llama with the byte tokenizer (seconds); the embedded model
checks token-exact prompt lengths and answers one real 2K pass key under ReAttention.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from reattention_core import ReAttentionConfig, ReAttentionEngine
from reattention_core.errors import ConfigError, InvalidInputError
from reattention_core.evaluation import (
    NeedleGrid,
    QAGrid,
    ResultsFile,
    even_depths,
    found,
    make_sample,
    read_rows,
    run_grid,
    run_qa,
    score,
)
from reattention_core.evaluation.cli import parse_depths, parse_overrides, parse_tokens
from reattention_core.evaluation.facts import corpus_of_size, make_corpus
from reattention_core.evaluation.haystack import Haystack, split_pieces
from reattention_core.evaluation.qa import truncate_records
from reattention_core.evaluation.report import heatmap, markdown_table, qa_plot
from reattention_core.evaluation.tasks import TASKS, get_task, haystack_kind, sample_seed
from tests.helpers import ByteTokenizer, tiny_model

# -- scoring -------------------------------------------------------------------------------------


def test_score_matches_whole_numbers_and_words_only():
    assert score(" 12345.", ["12345"]) == 1.0
    assert score("The key is 123456", ["12345"]) == 0.0  # no match inside a longer number
    assert score("a12345", ["12345"]) == 0.0
    assert score("key=12345!", ["12345"]) == 1.0
    assert score("they live in VELMORA bay", ["Velmora  Bay"]) == 1.0  # case and whitespace
    assert score("velmorabay", ["Velmora Bay"]) == 0.0
    assert score("", ["12345"]) == 0.0


def test_score_is_recall_over_distinct_expected():
    assert score("1111111 and 3333333", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert score("1111111", ["1111111", "1111111"]) == 1.0  # duplicates count once
    assert found("b then a", ["a", "b", "c"]) == ["a", "b"]
    for bad in ([], "12345", [""], ["  "]):
        with pytest.raises(InvalidInputError):
            score("x", bad)


# -- haystacks and samples -----------------------------------------------------------------------


def test_split_pieces_restores_the_text():
    text = "First one. Second!  Third?\n\nFourth: end"
    pieces = split_pieces(text)
    assert "".join(pieces) == text and len(pieces) == 5


def test_haystack_puts_needles_in_depth_order_and_repeats_the_source():
    tok = ByteTokenizer()
    h = Haystack(tok, "filler")
    n = 3 * h.tokens_per_pass + 123  # longer than the source: it repeats
    text = h.build(n, [(0.9, "NEEDLE-LATE"), (0.1, "NEEDLE-EARLY")])
    assert abs(len(tok(text)["input_ids"]) - n) < 40
    early, late = text.index("NEEDLE-EARLY"), text.index("NEEDLE-LATE")
    assert 0.05 < early / len(text) < 0.15 and 0.85 < late / len(text) < 0.95
    with pytest.raises(InvalidInputError):
        h.build(100, [(1.5, "x")])
    with pytest.raises(InvalidInputError):
        Haystack(tok, "poetry")


def test_docs_haystack_is_natural_text_in_a_fixed_order():
    tok = ByteTokenizer()
    a, b = Haystack(tok, "docs"), Haystack(tok, "docs")
    assert a.fingerprint == b.fingerprint and a.tokens_per_pass > 100_000
    assert a.build(2000) == b.build(2000)
    assert "The grass is green" not in a.build(5000)


def test_samples_are_seeded_by_coordinates_only():
    tok = ByteTokenizer()
    h = Haystack(tok, "filler")
    s1 = make_sample("passkey", tok, h, 600, 0.5, 0, base_seed=7)
    assert s1 == make_sample("passkey", tok, h, 600, 0.5, 0, base_seed=7)
    keys = {make_sample("passkey", tok, h, 600, 0.5, i, base_seed=7).expected for i in range(6)}
    assert len(keys) == 6  # each sample index hides a different key
    assert sample_seed(7, "passkey", 600, 0.5, 0) != sample_seed(7, "passkey", 600, 0.5, 1)
    assert sample_seed(7, "passkey", 600, 0.5, 0) != sample_seed(8, "passkey", 600, 0.5, 0)


def test_jitter_moves_the_needle_and_keeps_the_key():
    tok = ByteTokenizer()
    h = Haystack(tok, "filler")
    plain = [make_sample("passkey", tok, h, 2000, 0.5, i, base_seed=7) for i in range(6)]
    moved = [make_sample("passkey", tok, h, 2000, 0.5, i, base_seed=7, jitter=0.1) for i in range(6)]
    assert moved[0] == make_sample("passkey", tok, h, 2000, 0.5, 0, base_seed=7, jitter=0.1)  # still seeded
    assert [s.expected for s in moved] == [s.expected for s in plain]  # same keys ...
    assert all(s.needle_depth == 0.5 for s in plain)
    depths = [s.needle_depth for s in moved]
    assert len(set(depths)) == 6 and all(0.4 <= d <= 0.6 for d in depths)  # ... at six other places
    places = {s.prompt.index(s.expected[0]) for s in moved}
    assert len(places) >= 4 and plain[0].prompt.index(plain[0].expected[0]) not in places
    assert make_sample("cwe", tok, h, 600, 0.5, 0, jitter=0.1).needle_depth is None  # no needle to move
    with pytest.raises(InvalidInputError, match="jitter"):
        make_sample("passkey", tok, h, 600, 0.5, 0, jitter=0.7)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_builds_an_answerable_prompt_of_the_requested_length(task):
    tok = ByteTokenizer()
    kind = haystack_kind(task)
    h = None if get_task(task).generated else Haystack(tok, kind)
    length = 16000 if task == "cwe" else 6000  # bytes: its one-shot example and 30 x 10 words take 7K
    s = make_sample(task, tok, h, length, 0.3, 2, base_seed=1)
    # Text haystacks are cut anywhere: exact. Generated ones grow by whole lines or list entries: close.
    assert abs(s.prompt_tokens - length) <= (120 if get_task(task).generated else 0)
    assert s.prompt_tokens == len(tok(s.prompt)["input_ids"])
    assert s.prompt.endswith(s.answer_prefix)
    content = s.messages[-1]["content"]
    assert s.messages[-1]["role"] == "user" and content in s.prompt
    assert [m["role"] for m in s.messages] == (["system", "user"] if task == "niah" else ["user"])
    assert all(e in content for e in s.expected)
    assert s.score(" ".join(s.expected)) == 1.0 and s.score("no idea") == 0.0
    if task == "cwe":
        assert s.depth is None
        listed = content[content.rindex("most often.\n") :]  # the task's list, after the one-shot example
        words = re.findall(r"\d+\. ([a-z]+)", listed)
        top = Counter(words).most_common(len(s.expected) + 1)
        assert {w for w, _ in top[:-1]} == set(s.expected) and top[-1][1] < top[-2][1]
    if task == "vt":  # the chain starts with the value and links every expected name in order
        chain = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\n", content[content.rindex("Memorize") :] + "\n")
        assert [a for a, _ in chain] == list(s.expected)
        assert all(b == chain[i - 1][0] for i, (_, b) in enumerate(chain) if i)


def test_embedded_tokenizer_gives_exact_prompt_lengths(embedded_engine):
    tok = embedded_engine.tokenizer
    h = Haystack(tok, "docs")
    for length, depth in ((1000, 0.0), (3000, 0.5), (5000, 1.0)):
        s = make_sample("passkey", tok, h, length, depth, 0)
        assert s.prompt_tokens == length == len(embedded_engine.encode(s.prompt))
        assert f"The pass key is {s.expected[0]}" in s.prompt


# -- the grid runner -----------------------------------------------------------------------------


@pytest.fixture
def tiny_engine():
    model = tiny_model("llama")
    return ReAttentionEngine(
        model,
        ByteTokenizer(),
        ReAttentionConfig(sink_size=4, block_size=8, top_k=2, max_blocks=4, local_window=64, prefill_chunk_size=64),
        model_name="tiny-llama",
        cache=False,
    )


def _grid(**kw):
    base = dict(
        tasks=("passkey",),
        lengths=(256,),
        depths=(0.2, 0.8),
        modes=("reattention", "full"),
        haystack="filler",
        max_new_tokens=3,
    )
    base.update(kw)
    return NeedleGrid(**base)


def test_grid_validates_its_inputs():
    for bad in (
        dict(tasks=("nope",)),
        dict(modes=("sparse",)),
        dict(lengths=(10,)),
        dict(depths=(1.2,)),
        dict(samples=0),
        dict(haystack="x"),
        dict(lengths=()),
        dict(mode_max_length={"bogus": 5}),
    ):
        with pytest.raises(InvalidInputError):
            _grid(**bad)
    assert even_depths(1) == (0.5,) and even_depths(3) == (0.05, 0.5, 0.95)
    cells = _grid(tasks=("passkey", "cwe"), lengths=(200, 300), mode_max_length={"full": 200}).cells()
    assert not any(c.mode == "full" and c.length == 300 for c in cells)
    assert any(c.mode == "full" and c.length == 200 for c in cells)
    assert {c.depth for c in cells if c.task == "cwe"} == {None}


def test_run_grid_writes_rows_resumes_and_restores_the_config(tiny_engine, tmp_path):
    out = tmp_path / "r.jsonl"
    grid = _grid(lengths=(256, 320))
    before = tiny_engine.config
    report = run_grid(tiny_engine, grid, ResultsFile(out), limit=3, progress=False)
    assert report.ran == 3 and not report.interrupted and tiny_engine.config == before
    rows = read_rows(out)
    assert len(rows) == 3
    r = rows[0]
    assert r["env"]["model"] == "tiny-llama" and r["env"]["commit"] and r["env"]["torch"]
    assert r["config"]["mode"] == r["mode"] and r["prompt_tokens"] == 256 and 0.0 <= r["score"] <= 1.0
    # The same sample goes to every mode.
    first_two = rows[:2]
    assert first_two[0]["sample_seed"] == first_two[1]["sample_seed"]
    assert {x["mode"] for x in first_two} == {"reattention", "full"}

    with out.open("a") as f:  # a torn line from a crash mid-write
        f.write('{"task": "passkey", "len')
    report = run_grid(tiny_engine, grid, ResultsFile(out), progress=False)
    assert report.skipped == 3 and report.ran == len(grid.cells()) - 3
    rows = read_rows(out)
    assert len(rows) == len(grid.cells())
    assert len({(x["length"], x["depth"], x["mode"]) for x in rows}) == len(rows)
    assert run_grid(tiny_engine, grid, ResultsFile(out), progress=False).ran == 0


def test_jittered_cells_are_other_cells_and_old_rows_count_as_unjittered(tiny_engine, tmp_path):
    out = tmp_path / "r.jsonl"
    plain = _grid(lengths=(256,), depths=(0.5,), modes=("reattention",))
    assert run_grid(tiny_engine, plain, ResultsFile(out), progress=False).ran == 1
    rows = read_rows(out)
    assert rows[0]["jitter"] == 0.0 and rows[0]["needle_depth"] == rows[0]["depth"]
    # a row written before the jitter existed has no such field: it is the same cell
    legacy = {k: v for k, v in rows[0].items() if k != "jitter"}
    out.write_text(json.dumps(legacy) + "\n")
    assert run_grid(tiny_engine, plain, ResultsFile(out), progress=False).ran == 0
    moved = _grid(lengths=(256,), depths=(0.5,), modes=("reattention",), jitter=0.05)
    assert run_grid(tiny_engine, moved, ResultsFile(out), progress=False).ran == 1  # not the same cell
    row = read_rows(out)[-1]
    assert (
        row["jitter"] == 0.05
        and row["needle_depth"] != row["depth"]
        and abs(row["needle_depth"] - row["depth"]) <= 0.05
    )
    assert run_grid(tiny_engine, moved, ResultsFile(out), progress=False).ran == 0
    with pytest.raises(InvalidInputError, match="jitter"):
        _grid(jitter=-0.1)


def test_budgeted_offload_rows_are_marked_and_never_mix_with_exact_ones(tiny_engine, tmp_path):
    from reattention_core import OffloadConfig

    out = tmp_path / "r.jsonl"
    grid = _grid(lengths=(256,), depths=(0.5,), modes=("reattention",))
    assert run_grid(tiny_engine, grid, ResultsFile(out), progress=False).ran == 1
    budgeted = ReAttentionEngine(
        tiny_engine.model,
        tiny_engine.tokenizer,
        tiny_engine.config,
        model_name=tiny_engine.model_name,
        cache=False,
        offload=OffloadConfig(block=16, budget=2, refine=False, pin=False),
    )
    assert run_grid(budgeted, grid, ResultsFile(out), progress=False).ran == 1  # its own cell
    rows = read_rows(out)
    assert [r["offload"] for r in rows] == [None, "block=16,budget=2"]
    table = markdown_table(rows)
    assert "| reattention |" in table and "| reattention offload(block=16,budget=2) |" in table
    exact = ReAttentionEngine(
        tiny_engine.model,
        tiny_engine.tokenizer,
        tiny_engine.config,
        model_name=tiny_engine.model_name,
        cache=False,
        offload=OffloadConfig(block=16, budget=2, refine=True, pin=False),
    )
    assert run_grid(exact, grid, ResultsFile(out), progress=False).ran == 0  # exact offload = the resident cell


def test_config_overrides_run_as_their_own_cells_and_leave_the_engine_as_it_was(tiny_engine, tmp_path):
    out = tmp_path / "r.jsonl"
    grid = _grid(lengths=(256,), depths=(0.5,), modes=("reattention",))
    assert run_grid(tiny_engine, grid, ResultsFile(out), progress=False).ran == 1
    tried = _grid(lengths=(256,), depths=(0.5,), modes=("reattention",), overrides=(("top_k", 1), ("max_blocks", 2)))
    assert tried.overrides_tag == "max_blocks=2,top_k=1"
    assert run_grid(tiny_engine, tried, ResultsFile(out), progress=False).ran == 1  # not the preset's cell
    assert (tiny_engine.config.top_k, tiny_engine.config.max_blocks) == (2, 4)  # restored
    rows = read_rows(out)
    assert [r["overrides"] for r in rows] == [None, "max_blocks=2,top_k=1"]
    assert (rows[1]["config"]["top_k"], rows[1]["config"]["max_blocks"]) == (1, 2)
    assert (rows[0]["config"]["top_k"], rows[0]["config"]["max_blocks"]) == (2, 4)
    table = markdown_table(rows)
    assert "| reattention |" in table and "| reattention [max_blocks=2,top_k=1] |" in table
    assert run_grid(tiny_engine, tried, ResultsFile(out), progress=False).ran == 0  # resumes
    assert run_grid(tiny_engine, grid, ResultsFile(out), progress=False).ran == 0


def test_bad_config_overrides_are_refused_before_any_cell(tiny_engine, tmp_path):
    for bad in ((("mode", 1),), (("top_k", 2), ("top_k", 3)), (("top_k", 2.5),), (("top_k", True),)):
        with pytest.raises(InvalidInputError, match="override"):
            _grid(overrides=bad)
    out = tmp_path / "r.jsonl"
    # valid names, invalid config: a prefill chunk larger than the local window
    with pytest.raises(ConfigError, match="prefill_chunk_size"):
        run_grid(tiny_engine, _grid(overrides=(("prefill_chunk_size", 128),)), ResultsFile(out), progress=False)
    assert read_rows(out) == []
    assert parse_overrides(["top_k=8", "max_blocks=48"]) == (("max_blocks", 48), ("top_k", 8))
    assert parse_overrides(None) == ()
    for bad in (["topk=8"], ["top_k=eight"], ["top_k"], ["top_k=8", "top_k=9"], ["top_k=-1"]):
        with pytest.raises(InvalidInputError, match="--set"):
            parse_overrides(bad)


def test_ctrl_c_keeps_whole_rows_and_the_rerun_finishes(tiny_engine, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    real = tiny_engine.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_engine, "generate", flaky)
    before = tiny_engine.config
    report = run_grid(tiny_engine, _grid(), ResultsFile(out), progress=False)
    assert report.interrupted and report.ran == 2 and tiny_engine.config == before
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x) for x in lines)
    report = run_grid(tiny_engine, _grid(), ResultsFile(out), progress=False)
    assert report.ran == len(_grid().cells()) - 2 and not report.interrupted


def test_report_table_and_heatmap_png(tiny_engine, tmp_path):
    out = tmp_path / "r.jsonl"
    run_grid(
        tiny_engine,
        _grid(modes=("reattention", "streaming"), depths=(0.5,), lengths=(256, 320)),
        ResultsFile(out),
        progress=False,
    )
    rows = read_rows(out)
    table = markdown_table(rows)
    assert "| passkey | reattention |" in table and "| passkey | streaming |" in table
    png = heatmap(rows, tmp_path / "fig" / "heat.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# -- corpus QA -----------------------------------------------------------------------------------


def test_fact_corpus_questions_need_their_records_and_prefixes_point_at_the_answer():
    corpus = make_corpus(30, 8, seed=3)
    assert corpus == make_corpus(30, 8, seed=3)
    kinds = Counter(q.kind for q in corpus.questions)
    assert kinds == {"single": 4, "multi": 4}
    numbers = re.compile(r"\d+")
    for q in corpus.questions:
        support = [corpus.records[i] for i in q.support]
        # The answer is in the supporting records, written right after the words of the prefix
        # (the prefix's last step, for a two-step question); a door code is in no other record.
        last_prefix = q.answer_prefix if q.follow_up is None else q.follow_up.format(office=q.hop_answer)
        last_fact = last_prefix.split(". ")[-1]
        assert f"{last_fact} {q.answer}," in support[-1]
        if last_fact.endswith("door code"):
            assert [r for r in corpus.records if q.answer in numbers.findall(r)] == [support[-1]]
        if q.kind == "single":
            assert len(q.support) == 1 and q.follow_up is None
            continue
        # Two hops: the person's record names the office; the office's record holds the code, and
        # shares no word with the question beyond the template's own words.
        person, office = support
        assert len(q.support) == 2 and f"{q.answer_prefix} {q.hop_answer}," in person
        assert q.hop_answer not in numbers.findall(q.text) and q.answer not in person
        name = q.answer_prefix.removesuffix(", office")
        assert name in q.text and name not in office and office.startswith(f"Record {q.support[1] + 1}: Office ")
    with pytest.raises(InvalidInputError):
        make_corpus(2, 1, seed=0)
    with pytest.raises(InvalidInputError):
        make_corpus(10, 11, seed=0)


def test_answer_question_runs_two_steps_on_what_the_first_named():
    from reattention_core.evaluation.facts import hop_value
    from reattention_core.evaluation.qa import answer_question

    corpus = make_corpus(30, 4, seed=0)
    single, multi = corpus.questions[0], corpus.questions[-1]
    assert (single.kind, multi.kind) == ("single", "multi")
    seen = []

    def ask(prefix):
        seen.append(prefix)
        return " 1234, lives in Soko." if len(seen) == 1 else " 98765, is on floor 3."

    text, extra = answer_question(ask, multi)
    assert seen == [multi.answer_prefix, multi.follow_up.format(office="1234")]
    assert seen[1].endswith("Office 1234, door code") and text == " 98765, is on floor 3."
    assert extra["hop"] == "1234" and extra["hop_correct"] == (multi.hop_answer == "1234")
    seen.clear()
    text, extra = answer_question(ask, single)
    assert seen == [single.answer_prefix] and "hop" not in extra
    assert hop_value(" Vide Works.") == "Vide" and hop_value("") == "" and hop_value("office 12a") == "12"


def test_render_prompt_ends_with_the_answer_prefix_after_the_assistant_turn(embedded_engine):
    from reattention_core.evaluation.qa import render_prompt

    tok = embedded_engine.tokenizer
    prompt = render_prompt(
        tok, "Record 1: A B, office 1234, lives in C.", "Which office does A B work in?", "A B, office"
    )
    opened = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(opened[opened.index("x") + 1 :] + "A B, office")
    assert "Record 1: A B, office 1234, lives in C.\n\nWhich office does A B work in?" in prompt


def test_corpus_of_size_and_truncation_follow_token_counts():
    def count(text: str) -> int:
        return len(text.encode())

    corpus, n = corpus_of_size(6000, 6, seed=0, count=count)
    assert abs(n - 6000) < 600 and n == count(corpus.text)
    kept, text = truncate_records(corpus.records, 2000, count)
    assert count(text) <= 2000 < count("\n\n".join(corpus.records[: kept + 1]))
    assert truncate_records(corpus.records, 5, count) == (0, "")


def test_in_context_prompts_hold_every_supporting_record_once_and_whole():
    # The in-context modes' failures on facts-v2 (docs/results.md, "Why the model fails in context")
    # are not a prompt bug: each question's records are in its prompt, verbatim, once, before the
    # question, and truncation keeps exactly the records it reports.
    from reattention_core.evaluation.qa import render_prompt

    def count(text: str) -> int:
        return len(text.encode())

    class Plain:  # no chat template: render_prompt joins context, question and prefix
        chat_template = None

    corpus, _ = corpus_of_size(8000, 8, seed=0, count=count)
    assert corpus == corpus_of_size(8000, 8, seed=0, count=count)[0]  # deterministic per seed
    kept, truncated = truncate_records(corpus.records, 4000, count)
    assert 0 < kept < len(corpus.records)
    for q in corpus.questions:
        prompt = render_prompt(Plain(), corpus.text, q.text, q.answer_prefix)
        assert prompt.endswith(f"\n\n{q.text}\n\n{q.answer_prefix}")
        for i in q.support:
            assert prompt.count(corpus.records[i] + "\n\n") == 1
            assert prompt.index(corpus.records[i]) < prompt.index(q.text)
            assert (corpus.records[i] in truncated.split("\n\n")) == (i < kept)


def test_bm25_retriever_is_a_langchain_retriever_that_finds_the_person():
    from langchain_core.retrievers import BaseRetriever

    from reattention_core.evaluation.rag import make_retriever

    corpus = make_corpus(40, 6, seed=1)
    retriever = make_retriever(corpus.records, k=3)
    assert isinstance(retriever, BaseRetriever)
    for q in corpus.questions:
        got = [d.metadata["id"] for d in retriever.invoke(q.text)]
        # Single-fact and first-hop records are named in the question; the second hop's is not.
        assert len(got) == 3 and q.support[0] in got
    with pytest.raises(InvalidInputError):
        make_retriever([], k=2)


def test_run_qa_answers_every_mode_and_reuses_the_corpus(tiny_engine, tmp_path):
    tiny_engine_cached = ReAttentionEngine(
        tiny_engine.model, tiny_engine.tokenizer, tiny_engine.config, model_name="tiny-llama"
    )
    out = tmp_path / "qa.jsonl"
    grid = QAGrid(sizes=(1500,), questions=2, top_k=2, max_new_tokens=3, yarn_factor=2)
    report = run_qa(tiny_engine_cached, grid, ResultsFile(out), progress=False)
    rows = read_rows(out)
    assert report.ran == 8 and len(rows) == 8
    assert {r["mode"] for r in rows} == {"reattention", "rag", "full-truncated", "yarn"}
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in ("reattention", "rag", "full-truncated", "yarn")}
    assert by_mode["reattention"][1]["cached_tokens"] > 0  # the second question reuses the corpus
    assert all(len(r["retrieved"]) == 2 for r in by_mode["rag"])
    # The tiny model's window (1024) holds only part of a 1500-token corpus.
    assert all(0 < r["records_in_context"] < r["records"] for r in by_mode["full-truncated"])
    # YaRN x2 stretches it to 2048: every record fits, at full attention with the scaled RoPE
    assert all(r["records_in_context"] == r["records"] for r in by_mode["yarn"])
    assert all(r["config"]["mode"] == "full" and r["config"]["yarn_factor"] == 2.0 for r in by_mode["yarn"])
    assert all(r["config"]["yarn_factor"] is None for r in rows if r["mode"] != "yarn")
    assert {r["question"] for r in by_mode["rag"]} == {r["question"] for r in by_mode["reattention"]}
    assert all(r["haystack"] == "facts-v2" for r in rows)
    for r in rows:  # every mode continues the same answer prefix; the two-step rows its second step
        assert r["answer_prefix"].endswith(", office" if r["question"].startswith("Which") else ", door code")
        assert ("first_step" in r) == (r["kind"] == "multi")
    assert run_qa(tiny_engine_cached, grid, ResultsFile(out), progress=False).skipped == 8
    png = qa_plot(rows, tmp_path / "qa.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InvalidInputError):
        QAGrid(sizes=(1500,), modes=("bm25",))


# -- command line --------------------------------------------------------------------------------


def test_cli_parsing_and_report(tmp_path, tiny_engine, capsys):
    import argparse

    from reattention_core.app.cli import main

    assert parse_tokens("4K") == 4096 and parse_tokens("1M") == 1 << 20 and parse_tokens("1500") == 1500
    assert parse_tokens("0.5K") == 512
    for bad in ("4G", "abc", "1.3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_tokens(bad)
    assert parse_depths(["5"]) == even_depths(5) and parse_depths(["0", "1"]) == (0.0, 1.0)
    with pytest.raises(InvalidInputError):
        parse_depths(["0.5", "2"])
    out = tmp_path / "r.jsonl"
    run_grid(tiny_engine, _grid(), ResultsFile(out), progress=False)
    assert main(["eval", "report", str(out), "--plot", str(tmp_path / "h.png")]) == 0
    assert "| passkey | full |" in capsys.readouterr().out and (tmp_path / "h.png").exists()


# -- one real cell -------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_finds_a_2k_pass_key_under_reattention(embedded_engine, tmp_path):
    grid = NeedleGrid(tasks=("passkey",), lengths=(2048,), depths=(0.25,), modes=("reattention",), haystack="filler")
    report = run_grid(embedded_engine, grid, ResultsFile(tmp_path / "r.jsonl"), progress=False)
    (row,) = report.rows
    assert row["prompt_tokens"] == 2048 > embedded_engine.config.scope_size
    assert row["hit"], row["answer"]


def test_two_runs_on_one_results_file_do_not_both_write_it(tiny_engine, tmp_path):
    """A second run while the first holds the file is refused (no cell computed and written twice);
    once the first is done, the same command resumes and finds nothing left to do."""
    out = tmp_path / "r.jsonl"
    grid = _grid(lengths=(256,), depths=(0.5,), modes=("reattention",))
    first = ResultsFile(out)
    with first.exclusive():
        with pytest.raises(InvalidInputError, match="another run is writing to"):
            run_grid(tiny_engine, grid, ResultsFile(out), progress=False)
        first.append({"task": "x", "length": 1})  # the holder still writes
    assert run_grid(tiny_engine, grid, ResultsFile(out), progress=False).ran == 1
    assert run_grid(tiny_engine, grid, ResultsFile(out), progress=False).ran == 0
    assert len(read_rows(out)) == 2


def test_needles_run_deepest_first_and_reuse_the_haystack_before_each_needle(tmp_path):
    """With the prefix cache on, each prompt prefills only from about its needle on (the runner puts
    the deepest needle first, so every prompt starts like the one before), and every answer is the
    one a cold run gives."""
    from reattention_core.cache import CacheConfig

    config = ReAttentionConfig(sink_size=4, block_size=8, top_k=2, max_blocks=4, local_window=64, prefill_chunk_size=64)
    grid = _grid(lengths=(1024,), depths=(0.3, 0.8), samples=3, jitter=0.05, modes=("reattention", "streaming"))

    def run(cache, name):
        engine = ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), config, model_name="tiny-llama", cache=cache)
        out = tmp_path / name
        assert run_grid(engine, grid, ResultsFile(out), progress=False).ran == len(grid.cells())
        return read_rows(out)

    cold = run(False, "cold.jsonl")
    warm = run(CacheConfig(disk=False, page_size=128), "warm.jsonl")

    # The same cells with the same answers (that warm equals cold bit for bit is test_prefix_cache's).
    def key(r: dict) -> tuple:
        return r["depth"], r["index"], r["mode"]

    assert {key(r): r["answer"] for r in warm} == {key(r): r["answer"] for r in cold}
    assert all(r["cached_tokens"] == 0 for r in cold)

    # deepest needle first, a sample's modes back to back
    depths = [r["needle_depth"] for r in warm]
    assert depths == sorted(depths, reverse=True) and len(set(depths)) == 6
    assert [r["mode"] for r in warm] == ["reattention", "streaming"] * 6
    haystack, tokenizer = Haystack(ByteTokenizer(), "filler"), ByteTokenizer()
    for i, row in enumerate(warm):
        sample = make_sample("passkey", tokenizer, haystack, 1024, row["depth"], row["index"], jitter=0.05)
        needle_at = len(tokenizer(sample.prompt[: sample.prompt.index(sample.expected[0]) - 16])["input_ids"])
        # the first prompt of each mode is cold; every later one reuses the whole pages before its needle
        assert row["cached_tokens"] == (0 if i < 2 else needle_at // 128 * 128), (needle_at, row)


def test_report_names_a_preset_spelled_out_by_overrides():
    from reattention_core.evaluation.report import usable

    preset = ReAttentionConfig.preset("qwen2.5-coder-1.5b").to_dict()
    base = {"task": "niah_single_2", "length": 65536, "mode": "reattention", "score": 1.0, "model": "/m/qwen"}
    rows = [
        {**base, "overrides": "block_size=32,local_window=8192,max_blocks=256", "config": preset},
        {**base, "overrides": "max_blocks=32", "config": {**preset, "max_blocks": 32}},
        {**base, "overrides": None, "config": preset},
    ]
    assert [r["mode"] for r in usable(rows)] == [
        "reattention [preset qwen2.5-coder-1.5b]",
        "reattention [max_blocks=32]",
        "reattention",
    ]
