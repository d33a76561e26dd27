"""Fuzzing (hypothesis, derandomized: the same examples on every run) of what users hand the package:
config values, prompts and message lists with sampling options, ``reattention`` command lines and
HTTP bodies. The only outcomes allowed are success, a typed error (`ReAttentionError`), an exit
code with a one-line message, or a 4xx with an OpenAI error body: never a traceback or a 5xx."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reattention_core import CacheConfig, OffloadConfig, ReAttentionConfig, ReAttentionEngine
from reattention_core.errors import ReAttentionError
from reattention_core.generation.sampling import SamplingParams
from tests.faults.common import write_checkpoint

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Text with what breaks naive code: lone surrogates, NUL and other controls, escapes, astral planes.
_ODD = ["\ud800", "\udfff", "\x00", "\x1b[2J", "\u202e", "\U0001f600", "\r\n", "\\", '"', "{{ }}", "{% raw %}"]
TEXT = st.lists(st.one_of(st.characters(), st.sampled_from(_ODD)), max_size=16).map("".join)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    TEXT,
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, float("nan"), float("inf"), "", "0", "1e9"]),
)
ANY = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6
)


def _typed(call, outcomes: Counter | None = None) -> None:
    """Run ``call``: it may succeed or raise a typed error, nothing else."""
    try:
        call()
    except ReAttentionError as exc:
        if outcomes is not None:
            outcomes[type(exc).__name__] += 1
    else:
        if outcomes is not None:
            outcomes["ok"] += 1


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# -- config values --------------------------------------------------------------------------------


@FUZZ
@given(
    st.dictionaries(st.sampled_from(_fields(ReAttentionConfig)), ANY, max_size=5),
    st.dictionaries(TEXT, ANY, max_size=2),
)
def test_reattention_config_values(values, extra):
    def build():
        config = ReAttentionConfig(**values)
        config.check_window(1024)
        assert config.scope_size is None or config.scope_size > 0
        config.fingerprint()
        ReAttentionConfig.from_dict({**config.to_dict(), **extra})

    _typed(build)


@FUZZ
@given(st.dictionaries(st.sampled_from(_fields(CacheConfig)), ANY, max_size=4))
@example({"disk_bytes": []})  # found by this test: AttributeError once
@example({"disk_bytes": "infG"})
@example({"dir": []})  # found by this test: a TypeError at the first use once
@example({"enabled": "no"})
def test_cache_config_values(values):
    def build():
        config = CacheConfig(**values)
        config.page_size_for(ReAttentionConfig(prefill_chunk_size=16, local_window=32))
        config.resolved_dir()
        config.resolved_disk_bytes()

    _typed(build)


@FUZZ
@given(st.dictionaries(st.sampled_from([f for f in _fields(OffloadConfig) if f != "spill_dir"]), ANY, max_size=4))
def test_offload_config_values(values):
    _typed(lambda: OffloadConfig(**values))


@FUZZ
@given(st.dictionaries(st.sampled_from(_fields(SamplingParams)), ANY, max_size=4))
@example({"stop": None})  # found by this test: TypeError once
@example({"temperature": float("nan")})  # found by this test: accepted, then a crash while sampling
@example({"temperature": float("inf")})
@example({"seed": 2**64})  # found by the server fuzz: an overflow inside torch once
def test_sampling_values(values):
    def build():
        params = SamplingParams(**values)
        assert math.isfinite(params.temperature) and params.max_new_tokens >= 1

    _typed(build)


def test_server_config_values():
    pytest.importorskip("fastapi")
    from reattention_core.serving import AppConfig, ServeConfig

    @FUZZ
    @given(
        st.dictionaries(st.sampled_from(_fields(AppConfig)), ANY, max_size=4),
        st.dictionaries(st.sampled_from(_fields(ServeConfig)), ANY, max_size=3),
    )
    def check(app_values, serve_values):
        _typed(lambda: AppConfig(**app_values))

        def serve():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ServeConfig(**serve_values).check_exposure()

        _typed(serve)

    check()


# -- prompts, message lists, sampling options -----------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> ReAttentionEngine:
    folder = write_checkpoint(tmp_path_factory.mktemp("checkpoint"))
    return ReAttentionEngine.from_pretrained(
        str(folder), cache=CacheConfig(dir=tmp_path_factory.mktemp("cache")), config=None
    )


MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["tool", "", "USER", "developer"]), ANY), "content": st.one_of(TEXT, ANY)}
    ),
    ANY,
)
PROMPT = st.one_of(TEXT, st.lists(MESSAGE, max_size=4), ANY)
SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.one_of(st.integers(1, 3), ANY),
        "temperature": st.one_of(st.floats(0, 2), ANY),
        "top_p": st.one_of(st.floats(0, 1), ANY),
        "top_k": st.one_of(st.integers(0, 50), ANY),
        "seed": st.one_of(st.integers(), ANY),
        "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), ANY),
    },
)


def test_prompts_and_sampling_options(engine):
    outcomes: Counter = Counter()

    @FUZZ
    @given(PROMPT, st.one_of(st.none(), TEXT, ANY), SAMPLING)
    @example("a\ud800b", None, {})  # found: the tokenizer's UnicodeEncodeError once
    @example("hi", "corpus \udfff", {})
    @example([{"role": "user", "content": "\udcff"}], None, {})
    @example("hi", None, {"seed": 2**70, "temperature": 1.0})  # found: an overflow inside torch once
    @example("hi", None, {"temperature": float("nan")})
    def check(prompt, context, sampling):
        def run():
            request = engine.prepare(prompt, context=context, **sampling)
            short = dataclasses.replace(request.params, max_new_tokens=min(request.params.max_new_tokens, 2))
            result = engine.start(dataclasses.replace(request, params=short), progress=False).collect()
            assert result.prompt_tokens == len(request.ids)

        _typed(run, outcomes)

    check()
    print(dict(outcomes))
    assert outcomes["ok"] >= 10 and outcomes["InvalidInputError"] >= 10  # both sides of the checks were reached


# -- command lines --------------------------------------------------------------------------------

_WORDS = [
    "--max-new-tokens",
    "1",
    "2",
    "0",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "--temperature",
    "--top-p",
    "--seed",
    "99999999999999999999999",
    "--stop",
    "",
    "--chat",
    "--mode",
    "full",
    "streaming",
    "bogus",
    "--offload",
    "values",
    "host",
    "--offload-budget",
    "--offload-block",
    "--spill-dir",
    "notes",
    "--depth",
    "--tokens",
    "64",
    "--port",
    "99999",
    "--host",
    "::1",
    "--api-key",
    "--max-request-bytes",
    "1M",
    "12X",
    "--max-context",
    "--model-name",
    "-q",
    "--question",
    "--dir",
    "--all",
    "--json",
    "--models",
    "--no-warmup",
    "--compare-full",
    "--tokens",
    "200",
    "\ud800",
    "\x00",
    "--",
    "-",
    "x y",
]
# well-formed option groups too, so that half the command lines get past argparse
_VALID = [
    ["--max-new-tokens", "2"],
    ["--chat"],
    ["--temperature", "0.7"],
    ["--seed", "5"],
    ["--stop", "e"],
    ["--mode", "streaming"],
    ["--json"],
    ["--dir", "c"],
    ["--all"],
    ["--no-warmup"],
    ["--port", "8123"],
    ["--max-request-bytes", "2M"],
    ["-q", "What is the code?"],
    ["--compare-full"],
    ["--depth", "0.3"],
    ["notes"],
    ["--max-context", "900"],
    ["--depth", "nan"],
    ["--depth", "inf"],
    ["--depth", "-3"],
    ["--tokens", "0"],
]
ARGV = st.tuples(
    st.sampled_from(
        [
            ["generate", "hi"],
            ["generate"],
            ["ask"],
            ["ask", "notes"],
            ["cache", "ls"],
            ["cache", "rm"],
            ["cache"],
            ["demo", "--tokens", "64"],
            ["serve"],
            ["bogus"],
            [],
        ]
    ),
    st.one_of(
        st.lists(st.one_of(st.sampled_from(_WORDS), st.text("abcxyz019_-.", max_size=6)), max_size=6),
        st.lists(st.sampled_from(_VALID), max_size=3).map(lambda groups: [w for g in groups for w in g]),
    ),
)


def test_command_lines(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from reattention_core.app import cli
    from reattention_core.serving import server
    from tests.faults.common import tiny_engine

    monkeypatch.chdir(tmp_path)  # whatever the command writes (a sample corpus, a cache) lands here
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("The door code is 4711.")
    engine = tiny_engine(tmp_path / "cache")
    base = engine.config
    prepare = engine.prepare

    def short(*args, **kwargs):  # the real checks, then at most 3 tokens: the machine is small
        request = prepare(*args, **kwargs)
        params = dataclasses.replace(request.params, max_new_tokens=min(request.params.max_new_tokens, 3))
        return dataclasses.replace(request, params=params)

    monkeypatch.setattr(engine, "prepare", short)

    def load(args):
        cli.offload_config(args)  # the flag checks the real loader makes first
        engine.config = base if not args.mode else base.replace(mode=args.mode)
        return engine

    monkeypatch.setattr(cli, "_load", load)
    monkeypatch.setattr(server, "serve", lambda *a, **k: None)

    @settings(FUZZ, max_examples=80)
    @given(ARGV)
    @example((["demo", "--tokens", "64"], ["--depth", "nan"]))  # found by this test: a traceback once
    @example((["demo", "--tokens", "64"], ["--depth", "inf"]))
    @example((["generate", "\udcff"], []))  # an undecodable byte in argv, as Python passes it
    @example((["generate", "hi"], ["--temperature", "nan"]))  # found by this test: a sampling crash once
    @example((["serve"], ["--max-request-bytes", "12X"]))
    def check(argv):
        command, rest = argv
        # the streams of a real process: strict stdout, stderr with backslashreplace (argv may hold
        # lone surrogates: undecodable bytes arrive as U+DC80..U+DCFF)
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([*command, *rest])
            except SystemExit as exc:  # argparse: a usage error (2) or --help (0)
                code = exc.code
        assert code in (0, 1, 2, 130), code
        codes[code] += 1

    codes: Counter = Counter()
    check()
    print(dict(codes))
    assert codes[0] >= 5 and codes[2] >= 5


# -- HTTP bodies ----------------------------------------------------------------------------------

_BODY_FIELDS = {
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), ANY),
    "prompt": st.one_of(TEXT, ANY),
    "max_tokens": st.one_of(st.integers(1, 4), ANY),
    "max_completion_tokens": st.one_of(st.integers(1, 4), ANY),
    "temperature": st.one_of(st.floats(0, 2), ANY),
    "top_p": ANY,
    "top_k": ANY,
    "seed": ANY,
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), ANY),
    "stream": st.one_of(st.booleans(), ANY),
    "stream_options": st.one_of(st.just({"include_usage": True}), ANY),
    "n": ANY,
    "presence_penalty": ANY,
    "frequency_penalty": ANY,
    "user": ANY,
    "context": st.one_of(TEXT, ANY),
    "logprobs": ANY,
    "echo": ANY,
    "best_of": ANY,
    "suffix": ANY,
    "tools": ANY,
}
BODY = st.one_of(
    st.fixed_dictionaries({"model": st.one_of(st.just("tiny"), ANY)}, optional=_BODY_FIELDS).map(
        lambda d: json.dumps(d, allow_nan=True).encode()
    ),
    st.fixed_dictionaries(
        {"model": st.just("tiny"), "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
        optional={k: v for k, v in _BODY_FIELDS.items() if k != "messages"},
    ).map(lambda d: json.dumps(d, allow_nan=True).encode()),
    ANY.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=64),
)
ROUTE = st.sampled_from(
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("POST", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/nothing"),
        ("GET", "/health"),
    ]
)


def _check_response(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]"
        for event in events[:-1]:
            error = json.loads(event).get("error")
            assert error is None or error["type"] != "server_error", error
    elif r.status_code != 200:
        assert set(r.json()["error"]) >= {"message", "type"}


def test_http_bodies(engine):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from reattention_core.serving import AppConfig, create_app

    engine.config = engine.config.replace(max_context=512)
    try:
        app = create_app(engine, AppConfig(model_name="tiny", default_max_tokens=4, max_request_bytes=4096))
        with TestClient(app, raise_server_exceptions=False) as client:

            @FUZZ
            @given(ROUTE, BODY, st.sampled_from(["application/json", "text/plain", "application/octet-stream"]))
            @example(
                ("POST", "/v1/chat/completions"),  # found: 500 once
                b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}',
                "application/json",
            )
            @example(
                ("POST", "/v1/completions"), b'{"model": "tiny", "prompt": "hi", "seed": 1e30}', "application/json"
            )
            @example(
                ("POST", "/v1/completions"),  # found: 500 once
                b'{"model": "tiny", "prompt": "hi", "seed": 123456789012345678901234567890}',
                "application/json",
            )
            @example(("POST", "/v1/chat/completions"), b"[" * 100_000 + b"]" * 100_000, "application/json")
            @example(("POST", "/v1/completions"), b"x" * 5000, "application/json")  # over the body limit: 413
            def check(route, body, content_type):
                method, path = route
                r = client.request(method, path, content=body, headers={"content-type": content_type})
                _check_response(r)
                statuses[r.status_code] += 1

            statuses: Counter = Counter()
            check()
            print(dict(statuses))
            assert statuses[200] >= 5 and statuses[400] >= 10
    finally:
        engine.config = engine.config.replace(max_context=None)


def test_a_request_larger_than_memory_is_a_4xx_without_a_context_limit(engine):
    """With no --max-context, max_tokens=10**12 asks for a store no machine has: 400, not 500."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from reattention_core.serving import AppConfig, create_app

    assert engine.config.max_context is None
    with TestClient(create_app(engine, AppConfig(model_name="tiny")), raise_server_exceptions=False) as client:
        for path, body in (
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ):
            r = client.post(path, json={"model": "tiny", "max_tokens": 10**12, **body})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert (
            client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code == 200
        )


def test_checkpoint_tokenizer_round_trips(tmp_path):
    """The fuzzed engine's tokenizer is a real byte-level one: every string that is valid Unicode survives."""
    folder = write_checkpoint(tmp_path / "ck")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    for text in ("héllo wörld", "\U0001f600 \x00 \x1b[2J", "a\r\nb"):
        assert tok.decode(tok(text)["input_ids"]) == text
    assert Path(folder / "chat_template.jinja").is_file() or tok.chat_template
