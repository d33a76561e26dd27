"""A server under load: ``reattention serve`` on a tiny checkpoint, 32 concurrent ``openai`` clients.

The server is the real command (``python -m reattention_core.cli serve``, what the ``reattention``
script runs) in its own process, on loopback, serving the tiny Llama of `common.write_checkpoint`
with ``--max-context 2048 --max-request-bytes 1M``. For a fixed time, each of 32 client threads
(the ``openai`` package, its own client each, no retries) draws seeded requests:

* answers that are checked: chat and completions, streamed and not, some with a ``context``
  corpus (served from the prefix cache after its first request); greedy, so each completed
  answer must equal the engine's own answer for that prompt, computed in this process from the
  same checkpoint with the cache off;
* faults: streams abandoned after a few chunks, clients that give up waiting (a 50 ms timeout),
  malformed bodies (bad JSON, wrong types, unknown parameters, nesting 100,000 deep, lone
  surrogates, NaN, a seed beyond 64 bits, a max_tokens of 10**12, binary garbage, a lying
  Content-Type; each also sent once, in order, during the warm-up), prompts over the context
  limit, 1.5 MB bodies, an unknown model, and raw sockets that send half a body or no HTTP at all
  and hang up.

Figures: requests, completed answers and how many were wrong, responses by status (429s are the
queue doing its job), 5xx (must be 0), latency percentiles of completed answers (queueing
included), the server's resident memory after a warm-up and at the end, tracebacks in the
server's log (must be 0), and whether ``/health`` is ``ok`` and idle afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.faults.common import corpus, write_checkpoint

MODEL = "tiny-llama"
MAX_CONTEXT = 2048
MAX_REQUEST = 1 << 20
QUESTIONS = [
    "Tell me about the sea.",
    "What is a lamp?",
    "Count to five.",
    "Why is the sky blue?",
    "Name a river.",
    "Say hello in French.",
]
CONTEXTS = [corpus(1100, seed=41), corpus(1100, seed=42)]  # a page of 1024 tokens each, cached by the server
CONTEXT_QUESTIONS = QUESTIONS[:3]
MAX_TOKENS = (4, 12)
# what each client draws, and how often
KINDS = {
    "chat": 18,
    "chat-stream": 14,
    "completion": 8,
    "completion-stream": 6,
    "context": 10,
    "abandon-stream": 8,
    "give-up": 4,
    "malformed": 14,
    "over-context": 5,
    "over-size": 3,
    "unknown-model": 3,
    "raw-socket": 4,
}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Record:
    kind: str
    status: int | str  # HTTP status, or "disconnected" (the client hung up on purpose), "no-response"
    seconds: float
    correct: bool | None = None  # checked answers only


@dataclass
class LoadFigures:
    clients: int
    seconds: float
    requests: int
    completed: int  # answers received whole (and checked)
    wrong_answers: int
    statuses: dict[str, int]
    http_4xx: int
    http_429: int
    http_5xx: int
    faults_injected: dict[str, int]
    p50_ms: float
    p99_ms: float
    rss_after_warmup_mib: float
    rss_peak_mib: float
    rss_end_mib: float
    rss_growth_mib: float
    server_tracebacks: int
    health_after: dict[str, Any]
    records: list[Record] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("records")
        return out


# -- the server -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Server:
    """``reattention serve`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint: Path, workdir: Path) -> None:
        self.port = _free_port()
        self.log_path = workdir / "server.log"
        env = dict(
            os.environ,
            REATTENTION_CACHE_DIR=str(workdir / "cache"),
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        args = [
            sys.executable,
            "-m",
            "reattention_core.cli",
            "serve",
            "--model",
            str(checkpoint),
            "--model-name",
            MODEL,
            "--port",
            str(self.port),
            "--max-context",
            str(MAX_CONTEXT),
            "--max-tokens",
            "16",
            "--max-request-bytes",
            str(MAX_REQUEST),
            "--no-warmup",
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("the server did not start")

    def health(self) -> dict[str, Any]:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=10).json()

    def rss_mib(self) -> float:
        return _rss_mib(self.proc.pid)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def tracebacks(self) -> int:
        return self.log_path.read_text(errors="replace").count("Traceback (most recent call last)")


# -- what the answers must be ---------------------------------------------------------------------


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def expected_answers(checkpoint: Path) -> dict[tuple, str]:
    """The engine's own greedy answer to every prompt the clients may send, from the same checkpoint."""
    from reattention_core import ReAttentionEngine

    engine = ReAttentionEngine.from_pretrained(str(checkpoint), cache=False)
    out = {}
    for q in QUESTIONS:
        for n in MAX_TOKENS:
            out[("chat", q, n)] = engine.generate(_chat(q), max_new_tokens=n, progress=False).text
            out[("completion", q, n)] = engine.generate(q, max_new_tokens=n, progress=False).text
    for c, ctx in enumerate(CONTEXTS):
        for q in CONTEXT_QUESTIONS:
            for n in MAX_TOKENS:
                out[("context", c, q, n)] = engine.generate(
                    [{"role": "user", "content": q}], context=ctx, max_new_tokens=n, progress=False
                ).text
    return out


# -- clients --------------------------------------------------------------------------------------

_MALFORMED: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{not json", "application/json"),
    ("a JSON array", b"[1, 2, 3]", "application/json"),
    ("messages is a string", b'{"model": "%s", "messages": "hi"}', "application/json"),
    (
        "unknown parameter",
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "tools": []}',
        "application/json",
    ),
    (
        "nested 100000 deep",
        b'{"model": "%s", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "application/json",
    ),
    (
        "a lone surrogate",
        b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "application/json",
    ),
    (
        "NaN temperature",
        b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        "application/json",
    ),
    (
        "a seed beyond 64 bits",
        (b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "seed": 123456789012345678901234567890}'),
        "application/json",
    ),
    ("max_tokens 10**12", b'{"model": "%s", "prompt": "hi", "max_tokens": 1000000000000}', "application/json"),
    ("binary garbage", bytes(range(256)) * 4, "application/json"),
    ("JSON sent as text/plain", b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
    ("an empty body", b"", "application/json"),
    ("role tool", b'{"model": "%s", "messages": [{"role": "tool", "content": "x"}]}', "application/json"),
]


def _post(base_url: str, path: str, body: bytes, content_type: str) -> int:
    r = httpx.post(f"{base_url}{path}", content=body, headers={"content-type": content_type}, timeout=60)
    return r.status_code


def _raw_socket(port: int, rng: random.Random) -> int | str:
    """Half a body then a hang-up, or bytes that are not HTTP: whatever comes back (or nothing)."""
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode()
    if rng.random() < 0.5:
        data = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body) * 3)
        ) + body
    else:
        data = bytes(rng.randrange(256) for _ in range(200)) + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        try:
            head = s.recv(64)
        except OSError:
            return "no-response"
    if head.startswith(b"HTTP/1.1 "):
        return int(head[9:12])
    return "no-response"


def _one(
    kind: str,
    client,
    base_url: str,
    port: int,
    rng: random.Random,
    expected: dict[tuple, str],
    variant: int | None = None,
) -> Record:
    import openai

    t0 = time.perf_counter()

    def done(status: int | str, correct: bool | None = None) -> Record:
        return Record(kind, status, time.perf_counter() - t0, correct)

    q, n = rng.choice(QUESTIONS), rng.choice(MAX_TOKENS)
    try:
        if kind in ("chat", "chat-stream", "context"):
            stream = kind == "chat-stream" or (kind == "context" and rng.random() < 0.5)
            extra, messages, key = None, _chat(q), ("chat", q, n)
            if kind == "context":
                c, q = rng.randrange(len(CONTEXTS)), rng.choice(CONTEXT_QUESTIONS)
                extra, messages, key = {"context": CONTEXTS[c]}, [{"role": "user", "content": q}], ("context", c, q, n)
            if not stream:
                r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, extra_body=extra)
                return done(200, r.choices[0].message.content == expected[key])
            text, finished = "", None
            for chunk in client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=n, stream=True, extra_body=extra
            ):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finished = chunk.choices[0].finish_reason or finished
            return done(200, finished is not None and text == expected[key])
        if kind in ("completion", "completion-stream"):
            if kind == "completion":
                r = client.completions.create(model=MODEL, prompt=q, max_tokens=n)
                return done(200, r.choices[0].text == expected[("completion", q, n)])
            text, finished = "", None
            for chunk in client.completions.create(model=MODEL, prompt=q, max_tokens=n, stream=True):
                text += chunk.choices[0].text
                finished = chunk.choices[0].finish_reason or finished
            return done(200, finished is not None and text == expected[("completion", q, n)])
        if kind == "abandon-stream":
            stream = client.chat.completions.create(model=MODEL, messages=_chat(q), max_tokens=300, stream=True)
            for i, _chunk in enumerate(stream):
                if i >= rng.randrange(1, 4):
                    break
            stream.close()
            return done("disconnected")
        if kind == "give-up":
            with contextlib.suppress(httpx.TimeoutException):  # a 429 may come back in time
                r = httpx.post(
                    f"{base_url}/chat/completions",
                    json={"model": MODEL, "messages": _chat(q), "max_tokens": 64},
                    timeout=0.05,
                )
                return done(r.status_code)
            return done("disconnected")
        if kind == "malformed":
            _name, body, ctype = _MALFORMED[variant] if variant is not None else rng.choice(_MALFORMED)
            body = body.replace(b"%s", MODEL.encode())
            path = "/completions" if b'"prompt"' in body else "/chat/completions"
            return done(_post(base_url, path, body, ctype))
        if kind == "over-context":
            client.completions.create(
                model=MODEL, prompt=corpus(MAX_CONTEXT + 500, seed=rng.randrange(99)), max_tokens=4
            )
            return done(200, False)  # must not be answered
        if kind == "over-size":
            big = json.dumps({"model": MODEL, "prompt": "x" * (MAX_REQUEST + (MAX_REQUEST >> 1))}).encode()
            return done(_post(base_url, "/completions", big, "application/json"))
        if kind == "unknown-model":
            client.chat.completions.create(model="gpt-4o", messages=_chat(q), max_tokens=n)
            return done(200, False)
        if kind == "raw-socket":
            return done(_raw_socket(port, rng))
    except openai.APIStatusError as exc:
        return done(exc.status_code)
    except (openai.APIConnectionError, httpx.HTTPError, OSError):
        return done("no-response")
    raise AssertionError(kind)


def _client(
    i: int,
    seed: int,
    deadline: float,
    base_url: str,
    port: int,
    expected: dict,
    out: list[Record],
    lock: threading.Lock,
) -> None:
    import openai

    rng = random.Random(seed * 1000 + i)
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    kinds, weights = list(KINDS), list(KINDS.values())
    while time.monotonic() < deadline:
        record = _one(rng.choices(kinds, weights)[0], client, base_url, port, rng, expected)
        with lock:
            out.append(record)
        if record.status == 429:  # back off, as a client should
            time.sleep(rng.uniform(0.05, 0.3))
    client.close()


# -- the run --------------------------------------------------------------------------------------


def run(workdir: Path, *, clients: int = 32, seconds: float = 20.0, seed: int = 0) -> LoadFigures:
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(workdir / "checkpoint")
    server = Server(checkpoint, workdir)
    try:
        expected = expected_answers(checkpoint)  # while the server starts
        server.wait_ready()
        warm: list[Record] = []
        rng = random.Random(seed)
        import openai

        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as client:
            for kind in KINDS:  # every path once, so the memory after this is the server's working set
                warm.append(_one(kind, client, server.base_url, server.port, rng, expected))
            for variant in range(len(_MALFORMED)):  # and every malformed body, whatever the draws below
                warm.append(_one("malformed", client, server.base_url, server.port, rng, expected, variant))
        _wait_idle(server)
        rss_start = server.rss_mib()
        peak = [rss_start]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                with contextlib.suppress(OSError, RuntimeError):
                    peak.append(server.rss_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        records: list[Record] = []
        lock = threading.Lock()
        t0 = time.monotonic()
        deadline = t0 + seconds
        threads = [
            threading.Thread(
                target=_client,
                args=(i, seed, deadline, server.base_url, server.port, expected, records, lock),
                daemon=True,
            )
            for i in range(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 300)
        elapsed = time.monotonic() - t0
        health = _wait_idle(server)
        stop.set()
        sampler.join()
        rss_end = server.rss_mib()
    finally:
        server.stop()
    records = warm + records
    statuses = Counter(str(r.status) for r in records)
    done = [r for r in records if r.correct is not None and r.status == 200]
    latencies = sorted(r.seconds * 1000 for r in done)
    faults = Counter(
        r.kind
        for r in records
        if r.kind
        in ("abandon-stream", "give-up", "malformed", "over-context", "over-size", "unknown-model", "raw-socket")
    )
    return LoadFigures(
        clients=clients,
        seconds=round(elapsed, 1),
        requests=len(records),
        completed=len(done),
        wrong_answers=sum(not r.correct for r in done),
        statuses=dict(sorted(statuses.items())),
        http_4xx=sum(1 for r in records if isinstance(r.status, int) and 400 <= r.status < 500),
        http_429=statuses.get("429", 0),
        http_5xx=sum(1 for r in records if isinstance(r.status, int) and r.status >= 500),
        faults_injected=dict(sorted(faults.items())),
        p50_ms=round(statistics.median(latencies), 1) if latencies else 0.0,
        p99_ms=round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1) if latencies else 0.0,
        rss_after_warmup_mib=round(rss_start, 1),
        rss_peak_mib=round(max(peak), 1),
        rss_end_mib=round(rss_end, 1),
        rss_growth_mib=round(rss_end - rss_start, 1),
        server_tracebacks=server.tracebacks(),
        health_after=health,
        records=records,
    )


def _wait_idle(server: Server, timeout: float = 120.0) -> dict[str, Any]:
    """``/health`` once no generation runs or waits (abandoned ones stop at their next token)."""
    deadline = time.monotonic() + timeout
    while True:
        health = server.health()
        if (not health["busy"] and not health["pending"]) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)
