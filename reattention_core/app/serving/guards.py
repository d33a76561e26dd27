"""What stands between a client and the application: the API key and the request body's size.

`ApiKeyCheck` and `BodyLimit` are plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` logs a
traceback whenever a client hangs up mid-body, which under load is often); `PromptBound` refuses
over-long prompts before they are tokenised.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from reattention_core.errors import ContextLimitError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def key_matches(authorization: str, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries ``api_key``, in time independent of both.

    `hmac.compare_digest` takes constant time only for inputs of equal length (it returns at once
    on a length mismatch, which tells a prober the key's length): the two sides are hashed to
    fixed-length digests first.
    """
    given = hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).digest()
    wanted = hashlib.sha256(f"Bearer {api_key}".encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given, wanted)


class ApiKeyCheck:
    """ASGI middleware: ``/v1/`` requests without ``Authorization: Bearer <api_key>`` get a 401.

    The key is compared in time that depends on neither the key nor what was sent (`key_matches`).
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            if not key_matches(given.decode("latin-1"), self.api_key):
                await _error(
                    send,
                    401,
                    "missing or wrong API key (send Authorization: Bearer <key>)",
                    kind="authentication_error",
                    code="invalid_api_key",
                )
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: HTTP request bodies over ``limit`` bytes get a 413 with an OpenAI error body.

    uvicorn and FastAPI read a whole body into memory before validating it, so one huge body could
    grow the server until the OOM killer ends every client's generation. At most ``limit`` bytes are
    read: a ``Content-Length`` over it is refused at once, a chunked body as soon as it passes it, and a
    body within the limit reaches the application unchanged.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await _error(send, 400, "the Content-Length header is not a number")
            return
        if declared is not None and declared > self.limit:
            await _error(send, 413, self._too_large(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:  # read the body here, so that no more than the limit is ever held
            message = await receive()
            if message["type"] != "http.request":  # the client went away before its body was complete
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _error(send, 413, self._too_large(size, at_least=True))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    def _too_large(self, size: int, *, at_least: bool = False) -> str:
        return (
            f"the request body has {'more than ' if at_least else ''}{size:,} bytes, over this server's limit of "
            f"{self.limit:,} (reattention serve --max-request-bytes)"
        )


def _content_length(scope: Scope) -> int | None:
    """The declared body size; ``None`` without one, ``-1`` for a malformed one."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return -1
            return n if n >= 0 else -1
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages`` first, then the client's own (a disconnect, later)."""
    queue = list(messages)

    async def replayed() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replayed


async def _error(
    send: Send, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None
) -> None:
    code = code or ("request_too_large" if status == 413 else None)
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class PromptBound:
    """Refuses, without tokenising it, a prompt that cannot fit in ``max_context`` tokens.

    Tokenising a prompt far over ``--max-context`` costs far more memory than its text.

    A token stands for at most as many characters as its longest vocabulary entry has (one per
    byte in byte-level BPE, where the entry spells its bytes), so a text of ``C`` characters has
    at least ``C / longest`` tokens. The bound is taken with a 4x margin, for normalizers that
    shrink a text before it is split (Unicode composition): only prompts four times hopeless are
    refused here, every other one is tokenised and checked exactly by the engine.

    Args:
        tokenizer: the engine's tokenizer (without ``get_vocab``: nothing is refused here).
    """

    MARGIN = 4

    def __init__(self, tokenizer: Any) -> None:
        try:
            vocab = tokenizer.get_vocab()
            self.chars_per_token: int | None = self.MARGIN * max(len(str(t)) for t in vocab) if vocab else None
        except (AttributeError, TypeError, ValueError, NotImplementedError):
            self.chars_per_token = None

    def check(self, chars: int, max_new_tokens: int, max_context: int | None) -> None:
        """`ContextLimitError` if ``chars`` characters of prompt cannot fit beside ``max_new_tokens``."""
        if max_context is None or self.chars_per_token is None:
            return
        least = -(-chars // self.chars_per_token)
        if least + max_new_tokens > max_context:
            raise ContextLimitError(
                f"the prompt has {chars:,} characters, at least {least:,} tokens, and {max_new_tokens} more were "
                f"requested, over the configured max_context of {max_context}; shorten the prompt or lower max_tokens"
            )
