"""`reattention serve` under 32 concurrent clients with faults interleaved (see `tests.faults.load`)."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.faults import load

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the server's memory from /proc")

# The server's memory may grow a little while its allocators settle; a leak per request would not stay under this.
RSS_GROWTH_MIB = 64


def test_a_loaded_server_answers_right_and_never_fails(tmp_path, record_property):
    figures = load.run(tmp_path, clients=32, seconds=15, seed=0)
    record_property("server_load", figures.as_dict())
    print(figures.as_dict())
    assert figures.http_5xx == 0, [r for r in figures.records if isinstance(r.status, int) and r.status >= 500][:5]
    assert figures.wrong_answers == 0, [r for r in figures.records if r.correct is False][:5]
    assert figures.completed >= 30 and figures.server_tracebacks == 0
    for status in ("400", "404", "413", "429"):
        assert figures.statuses.get(status, 0) > 0, f"no {status} answer: the load did not reach that path"
    assert set(figures.faults_injected) == {
        "abandon-stream",
        "give-up",
        "malformed",
        "over-context",
        "over-size",
        "unknown-model",
        "raw-socket",
    }
    assert figures.statuses.get("disconnected", 0) > 0  # some abandoned streams were really under way
    health = figures.health_after
    assert health["status"] == "ok" and not health["busy"] and health["pending"] == 0 and health["cancelled"] > 0
    assert figures.rss_growth_mib < RSS_GROWTH_MIB


def test_an_oversize_body_gets_its_413_over_a_real_socket():
    """Over a real socket, with the client still uploading when the server answers: 413 for a declared length
    and for a chunked body, with an OpenAI error body; a body within the limit still works."""
    import httpx

    from reattention_core.serving import AppConfig, BackgroundServer
    from tests.faults.common import tiny_engine

    limit = 1 << 20
    with BackgroundServer(
        tiny_engine(None, cache=False), app_config=AppConfig(model_name="m", max_request_bytes=limit)
    ) as srv:
        big = b'{"model": "m", "prompt": "' + b"x" * (limit + (limit >> 1)) + b'"}'
        for _ in range(10):
            r = httpx.post(f"{srv.base_url}/completions", content=big, timeout=60)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.post(f"{srv.base_url}/completions", content=(b"x" * 65536 for _ in range(32)), timeout=60)
        assert r.status_code == 413 and "more than" in r.json()["error"]["message"]
        ok = httpx.post(f"{srv.base_url}/completions", json={"model": "m", "prompt": "hi " * 100, "max_tokens": 2})
        assert ok.status_code == 200


def test_a_prompt_far_over_the_context_limit_is_refused_before_tokenising(monkeypatch):
    """A prompt within the body limit but far over --max-context (1.5 MB for 2048 tokens) once kept 900 MiB of
    the server's memory while it was tokenised only to be refused; it is now refused from its length alone."""
    from fastapi.testclient import TestClient

    from reattention_core import tokenization
    from reattention_core.serving import AppConfig, create_app
    from tests.faults.common import tiny_engine

    engine = tiny_engine(None, cache=False)
    engine.config = engine.config.replace(max_context=2048)
    tokenised: list[int] = []
    real = tokenization.encode
    monkeypatch.setattr(
        tokenization, "encode", lambda tok, text, **kw: tokenised.append(len(text)) or real(tok, text, **kw)
    )
    engine.tokenizer.get_vocab = lambda: {bytes([b]).decode("latin-1"): b + 3 for b in range(256)}  # as a real one has
    with TestClient(create_app(engine, AppConfig(model_name="m")), raise_server_exceptions=False) as client:
        for prompt in ("x" * 1_500_000, "x" * 3000):  # far over: refused from its length; just over: tokenised
            r = client.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 4})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        chat = {"model": "m", "messages": [{"role": "user", "content": "y" * 600_000}], "max_tokens": 4}
        assert client.post("/v1/chat/completions", json=chat).status_code == 400
        assert client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert max(tokenised) < 10_000, "a hopeless prompt was tokenised"
