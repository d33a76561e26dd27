"""`reattention serve`: the real `openai` client over loopback, streaming, 4xx on bad input, disconnects."""

from __future__ import annotations

import json
import time
import warnings

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from reattention_core import CacheConfig, ReAttentionConfig, ReAttentionEngine
from reattention_core.app.serving import AppConfig, BackgroundServer, ServeConfig
from tests.helpers import ByteTokenizer, tiny_model

MODEL = "tiny-llama"
CFG = ReAttentionConfig(
    sink_size=4, block_size=4, top_k=2, max_blocks=4, local_window=32, prefill_chunk_size=16, max_context=400
)


@pytest.fixture(scope="module")
def engine() -> ReAttentionEngine:
    return ReAttentionEngine(
        tiny_model("llama"), ByteTokenizer(), CFG, model_name=MODEL, cache=CacheConfig(page_size=32, disk=False)
    )


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(engine, app_config=AppConfig(default_max_tokens=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_chat_completion_matches_the_engine(client, engine):
    messages = _chat("Tell me about the sea. " * 3)
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    want = engine.generate(messages, max_new_tokens=6)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert resp.usage.prompt_tokens == want.prompt_tokens == len(engine.encode(messages))
    assert resp.usage.completion_tokens == want.completion_tokens
    assert resp.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    assert resp.model == MODEL and resp.id.startswith("chatcmpl-")


def test_completion_endpoint_and_default_length(client, engine):
    resp = client.completions.create(model=MODEL, prompt="Once upon a time, " * 4)
    want = engine.generate("Once upon a time, " * 4, max_new_tokens=16)  # OpenAI's default max_tokens: 16
    assert resp.choices[0].text == want.text
    assert resp.usage.completion_tokens == want.completion_tokens


def test_streamed_chat_equals_the_whole_answer(client):
    messages = _chat("Count the waves: one, two, three. " * 2)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1, "the answer must arrive in several chunks"
    assert "".join(texts) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_completion_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "abc " * 10, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    pieces = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["object"] == "text_completion" for p in pieces)
    assert pieces[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_context_extension_reports_cached_tokens(client):
    corpus = "The lighthouse keeper counted ships every night. " * 6  # 300 bytes: several 32-token pages
    first = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Who counted?"}],
        max_tokens=3,
        extra_body={"context": corpus},
    )
    second = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What was counted?"}],
        max_tokens=3,
        extra_body={"context": corpus},
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 256


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"http://127.0.0.1:{server.port}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


@pytest.mark.parametrize(
    ("patch", "status", "needle"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "type"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
        ({"n": 2}, 400, "n=1"),
        ({"tools": [{"type": "function"}]}, 400, "unsupported parameter 'tools'"),
        ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
        ({"presence_penalty": 0.5}, 400, "penalt"),
        ({"temperature": -1}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"model": "gpt-4o"}, 404, "not served"),
        ({"messages": [{"role": "user", "content": "x" * 500}]}, 400, "max_context"),
    ],
)
def test_malformed_chat_requests_get_openai_errors(server, patch, status, needle):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **patch}
    r = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_malformed_completion_and_json(server):
    r = httpx.post(f"{server.base_url}/completions", json={"model": MODEL, "prompt": ["a", "b"]}, timeout=30)
    assert r.status_code == 400 and "one string" in r.json()["error"]["message"]
    r = httpx.post(
        f"{server.base_url}/completions", content=b"{not json", timeout=30, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()


def test_openai_client_raises_on_context_overflow(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 500}])
    assert info.value.code == "context_length_exceeded"


def test_disconnect_mid_stream_stops_generation_and_server_keeps_serving(server, client, engine):
    before = _health(server)
    body = {"model": MODEL, "prompt": "go " * 20, "max_tokens": 300, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few chunks, then hang up
    assert all(g.startswith("data: ") or g == "" for g in got)
    # The worker notices at its next piece and closes the engine's generator in its own thread,
    # which releases the engine lock: a direct engine call from this thread must get it soon.
    deadline = time.monotonic() + 30
    while server_busy(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server_busy(server), "the abandoned generation kept running"
    after = _health(server)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert engine._lock.acquire(timeout=5)
    engine._lock.release()
    resp = client.completions.create(model=MODEL, prompt="still there? ", max_tokens=4)
    assert resp.choices[0].finish_reason in ("stop", "length")


def _health(server) -> dict:
    return httpx.get(f"http://127.0.0.1:{server.port}/health").json()


def server_busy(server) -> bool:
    return _health(server)["busy"]


def test_api_key_and_non_loopback_warning(engine):
    with BackgroundServer(engine, app_config=AppConfig(api_key="secret")) as srv:
        bad = openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.base_url, api_key="secret", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL]
    with pytest.warns(UserWarning, match="any machine"):
        ServeConfig(host="0.0.0.0").check_exposure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ServeConfig(host="::1").check_exposure()  # loopback: silent
        ServeConfig(host="localhost").check_exposure()


def test_serve_subcommand_is_registered():
    from reattention_core.app.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "8123", "--max-context", "2048"])
    assert args.port == 8123 and args.host == "127.0.0.1" and args.max_context == 2048


def test_embedded_model_answers_through_the_server(embedded_engine):
    with BackgroundServer(embedded_engine) as srv:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        resp = c.chat.completions.create(
            model=embedded_engine.model_name,
            max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
    assert "Paris" in resp.choices[0].message.content
