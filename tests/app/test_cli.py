"""The ``reattention`` command line: ``ask`` (corpus reading, errors, a real answer with cache reuse),
``cache ls|rm`` on a real disk cache, and the sample corpus."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reattention_core import CacheConfig, ReAttentionConfig, ReAttentionEngine
from reattention_core.app import cli
from reattention_core.app.corpus import load_corpus
from reattention_core.app.sample_corpus import (
    SAMPLE_ANSWER_WORDS,
    SAMPLE_QUESTION,
    module_document,
    write_sample_corpus,
)
from reattention_core.errors import CorpusError
from tests.helpers import ByteTokenizer, tiny_model


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- corpus reading and typed errors (no model is loaded: they fail before it) ------------------------


def test_corpus_is_sorted_with_headers_and_skips_hidden_and_binary(tmp_path):
    (tmp_path / "b.md").write_text("bee\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("hidden")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "empty.rst").write_text("  \n")
    root = str(tmp_path)
    corpus = load_corpus([root, str(tmp_path / "b.md")])  # b.md twice: read once
    assert [d.path for d in corpus.documents] == [f"{root}/b.md", f"{root}/sub/a.txt"]
    assert corpus.text == f"### {root}/b.md\nbee\n\n### {root}/sub/a.txt\nay"
    assert sorted(corpus.skipped) == [f"{root}/empty.rst", f"{root}/image.png"]
    assert load_corpus([str(tmp_path / "sub"), root]).text == load_corpus([root, str(tmp_path / "sub")]).text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.md", "no such file or folder"),
        (lambda p: (p / "x.bin").write_bytes(b"abc\x00def") and p / "x.bin", "binary file"),
        (lambda p: (p / "x.txt").write_bytes(b"caf\xe9 latin-1") and p / "x.txt", "not UTF-8"),
        (lambda p: (p / "x.md").write_text("\n\n") and p / "x.md", "is empty"),
        (
            lambda p: (p / "d").mkdir() or (p / "d" / "pic.jpg").write_bytes(b"\xff\xd8\x00") and p / "d",
            "no text found",
        ),
    ],
    ids=["missing", "binary", "latin1", "empty-file", "no-text"],
)
def test_ask_errors_exit_2_with_a_one_line_hint(tmp_path, capsys, make, message):
    path = make(tmp_path)
    code, out, err = run(capsys, "ask", str(path), "-q", "anything?")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    with pytest.raises(CorpusError, match=message):
        load_corpus([path])


def test_ask_without_a_usable_question_exits_2(tmp_path, capsys):
    (tmp_path / "a.md").write_text("text")
    code, _, err = run(capsys, "ask", str(tmp_path), "-q", "   ")
    assert code == 2 and "question is empty" in err
    code, _, err = run(capsys, "ask", str(tmp_path))
    assert code == 2 and "no question" in err
    with pytest.raises(SystemExit) as exc:  # argparse usage error
        cli.main(["ask", str(tmp_path), "-q", "x", "--max-new-tokens", "many"])
    assert exc.value.code == 2


def test_sample_corpus_holds_the_answer_and_is_stable(tmp_path):
    files = write_sample_corpus(tmp_path / "s", ["bisect", "heapq"])
    assert [f.name for f in files] == ["bisect.md", "heapq.md"]
    text = files[0].read_text()
    assert (
        text.startswith("# The bisect module")
        and "## bisect.bisect_left\nReturn the index where to insert item x" in text
    )
    assert all(word in text.lower() for word in SAMPLE_ANSWER_WORDS)
    assert module_document("bisect") == text  # deterministic: a second run reuses the cache
    with pytest.raises(CorpusError, match="cannot import"):
        module_document("no_such_module_xyz")


# -- cache ls / rm on pages written by real (tiny) engines ---------------------------------------------


def _fill_cache(directory, name: str, seed: int) -> ReAttentionEngine:
    config = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=4, local_window=32, prefill_chunk_size=16)
    engine = ReAttentionEngine(
        tiny_model("llama", seed=seed),
        ByteTokenizer(),
        config,
        model_name=name,
        cache=CacheConfig(page_size=64, dir=directory),
    )
    engine.prefill("x" * 200, progress=False)  # 3 pages of 64 tokens
    engine.prefill("x" * 128 + "y" * 72, progress=False)  # shares 2 pages, adds 1: a second entry
    return engine


def test_cache_ls_and_rm(tmp_path, capsys):
    d = str(tmp_path / "cache")
    code, out, _ = run(capsys, "cache", "ls", "--dir", d)
    assert code == 0 and "nothing cached" in out
    a = _fill_cache(d, "tiny-a", 0)
    _fill_cache(d, "tiny-b", 1)
    code, out, _ = run(capsys, "cache", "ls", "--dir", d, "--json")
    rows = {r["model_name"]: r for r in json.loads(out)["namespaces"]}
    assert set(rows) == {"tiny-a", "tiny-b"}
    info = a.cache_info().disk
    assert (rows["tiny-a"]["entries"], rows["tiny-a"]["pages"], rows["tiny-a"]["tokens"]) == (2, 4, 256)
    assert (rows["tiny-a"]["pages"], rows["tiny-a"]["bytes"]) == (info.pages, info.bytes)
    code, out, _ = run(capsys, "cache", "ls", "--dir", d)
    assert code == 0 and "tiny-a" in out and "tiny-b" in out and "256" in out

    code, out, _ = run(capsys, "cache", "rm", "tiny-a", "--dir", d)
    assert code == 0 and out.startswith("removed tiny-a") and "4 page(s)" in out
    assert a.cache_info().disk.pages == 0
    assert [r["model_name"] for r in json.loads(run(capsys, "cache", "ls", "--dir", d, "--json")[1])["namespaces"]] == [
        "tiny-b"
    ]
    code, _, err = run(capsys, "cache", "rm", "tiny-a", "--dir", d)
    assert code == 2 and "holds: tiny-b" in err
    code, _, err = run(capsys, "cache", "rm", "--dir", d)
    assert code == 2 and "--all" in err
    code, out, _ = run(capsys, "cache", "rm", "--all", "--dir", d)
    assert code == 0 and "removed tiny-b" in out
    assert "nothing cached" in run(capsys, "cache", "ls", "--dir", d)[1]


# -- real answers with the embedded model ----------------------------------------------------------------


@pytest.fixture
def shared_engine(embedded_engine, monkeypatch):
    """`reattention ask` on the session's embedded engine (saves a 20 s load per command)."""
    monkeypatch.setattr(cli, "_load", lambda args: embedded_engine)
    return embedded_engine


@pytest.mark.slow
def test_ask_answers_from_the_corpus_and_reuses_it(tmp_path, capsys, shared_engine):
    # The README's main job: the default sample corpus (~7.8K tokens; the answer is ~7K tokens back).
    write_sample_corpus(tmp_path / "docs")
    argv = ("ask", str(tmp_path / "docs"), "-q", SAMPLE_QUESTION, "--max-new-tokens", "32")
    code, first, err1 = run(capsys, *argv)
    assert code == 0
    assert all(word in first.lower() for word in SAMPLE_ANSWER_WORDS), first
    assert "0 from the cache" in err1
    code, second, err2 = run(capsys, *argv)
    assert code == 0 and second == first  # greedy: a cached corpus gives the same answer
    cached = int(err2.split(" from the cache")[0].rsplit(", ", 1)[-1].replace(",", ""))
    corpus_tokens = int(err2.split("corpus: ")[1].split(" tokens")[0].replace(",", ""))
    assert cached >= 1024 and corpus_tokens - cached < 1024  # every whole page came from the cache


def test_chat_answers_each_question_over_the_cached_corpus(tmp_path, capsys, monkeypatch, shared_engine):
    (tmp_path / "facts.md").write_text("The secret color of the castle door is turquoise.\n" * 3)
    monkeypatch.setattr("sys.stdin", io.StringIO("What color is the castle door?\n\nexit\nnever asked\n"))
    code, out, err = run(
        capsys, "ask", str(tmp_path), "--chat", "-q", "What is the secret color?", "--max-new-tokens", "16"
    )
    assert code == 0
    answers = [line for line in out.split("question> ") if line.strip()]
    assert len(answers) == 2 and all("turquoise" in a.lower() for a in answers), out
    assert err.count("corpus:") == 2 and "never asked" not in out


def test_ask_reports_cache_reuse_and_works_with_the_cache_off(tmp_path):
    from reattention_core.app.ask import AskSettings, ask

    config = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=4, local_window=32, prefill_chunk_size=16)
    corpus = "### a.md\n" + "some words about things. " * 12  # ~300 byte tokens: 4 pages of 64
    settings = AskSettings(max_new_tokens=4)
    for cache, expect in ((CacheConfig(page_size=64, dir=tmp_path), "from the cache"), (False, "cache is off")):
        engine = ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), config, cache=cache)
        reports = []
        for _ in range(2):
            out, err = io.StringIO(), io.StringIO()
            reports.append(ask(engine, corpus, "what?", settings, out=out, err=err, progress=False))
            assert expect in err.getvalue() and out.getvalue() == reports[-1].answer + "\n"
        assert reports[0].answer == reports[1].answer  # greedy, and a cached corpus changes nothing
        if cache:
            assert reports[0].cached_tokens == 0 and reports[0].prefilled_tokens >= 256
            assert reports[1].cached_tokens == reports[0].prefilled_tokens and reports[1].prefilled_tokens == 0
        else:
            assert reports[1].cached_tokens == 0


_WITHOUT_EXTRAS = """
import sys
for name in ("fastapi", "uvicorn", "starlette", "matplotlib", "rank_bm25", "langchain_core", "llama_index"):
    sys.modules[name] = None  # makes `import name` raise ImportError, as on a machine without the extras
from reattention_core.app import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["--help"], ["eval", "passkey", "--help"], ["cache", "ls", "--dir", "{tmp}"]])
def test_commands_work_without_the_optional_extras(tmp_path, argv):
    # The GPU machine has none of the extras; `reattention eval` must still run there.
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_serve_without_its_extra_exits_2_with_the_install_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS, "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'reattention[serve]'" in done.stderr


def test_eval_plot_without_matplotlib_is_refused_before_the_run(tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = [
        "eval",
        "passkey",
        "--model",
        str(tmp_path / "no-model"),
        "--lengths",
        "2K",
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "f.png"),
    ]
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--plot needs matplotlib" in done.stderr and "eval report" in done.stderr
    assert not out.exists()  # refused before loading anything or writing a row


@pytest.mark.parametrize(
    "argv, want",
    [
        ([], None),
        (["--offload", "values"], dict(keys="device", refine=True)),
        (["--offload", "host"], dict(keys="host", refine=True, block=64)),
        (["--offload-budget", "8"], dict(keys="host", refine=False, budget=8, block=64)),
        (
            ["--offload", "host", "--offload-budget", "8", "--offload-block", "32"],
            dict(keys="host", budget=8, block=32),
        ),
        (["--offload", "values", "--spill-dir", "."], dict(keys="device", spill_dir=".")),
    ],
)
def test_offload_flags_build_the_store_they_name(argv, want):
    args = cli.build_parser().parse_args(["generate", "hi", *argv])
    got = cli.offload_config(args)
    if want is None:
        assert got is None
    else:
        assert {k: getattr(got, k) for k in want} == want


def test_an_offload_budget_on_the_values_store_is_refused_before_loading(capsys):
    code, _, err = run(capsys, "generate", "hi", "--offload", "values", "--offload-budget", "8")
    assert code == 2 and "--offload-budget applies to --offload host only" in err and "loading" not in err


def test_a_spill_dir_without_an_offloaded_store_is_refused(capsys):
    code, _, err = run(capsys, "generate", "hi", "--spill-dir", ".")
    assert code == 2 and "add --offload values or --offload host" in err


def test_cache_ls_and_rm_show_and_remove_converted_models(tmp_path, capsys, monkeypatch):
    from reattention_core import model_cache

    monkeypatch.setenv(model_cache.ENV_DIR, str(tmp_path / "models"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))

    class Tok:  # stands in for a tokenizer: `save_pretrained` writes one file
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{}")

    folder = model_cache.save(tiny_model("llama"), Tok(), gguf, torch.float32)
    d = str(tmp_path / "cache")
    code, out, _ = run(capsys, "cache", "ls", "--dir", d)
    assert code == 0 and str(gguf.resolve()) in out and "float32" in out and "nothing cached" in out
    rows = json.loads(run(capsys, "cache", "ls", "--dir", d, "--json")[1])["converted_models"]
    assert [r["folder"] for r in rows] == [str(folder)] and rows[0]["bytes"] > 0
    code, _, err = run(capsys, "cache", "rm", "--models", "--all", "--dir", d)
    assert code == 2 and "--models" in err and folder.exists()
    code, out, _ = run(capsys, "cache", "rm", "--models", "--dir", d)
    assert code == 0 and out.startswith("removed the converted copy") and not folder.exists()
    assert model_cache.find(gguf, torch.float32) is None
    assert run(capsys, "cache", "rm", "--models")[1].strip() == "no converted models"
