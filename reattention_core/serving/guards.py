"""What stands between a client and the application: the API key and the request body's size.

Both are plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` logs a traceback whenever a
client hangs up before its body is complete, which under load is often):

* `ApiKeyCheck`: ``/v1/`` routes need ``Authorization: Bearer <key>``, compared in time that
  depends on neither the key nor what was sent (`key_matches`);
* `BodyLimit`: uvicorn and FastAPI read a whole body into memory before validating it, whatever
  its size; a client sending gigabytes (by mistake or not) would grow the server until the OOM
  killer ends it, taking every other client's generation with it. `BodyLimit` keeps at most
  ``limit`` bytes: a larger body gets a 413 (the rest of it, up to 16 MiB, is read and dropped
  first, so that the client, still uploading, gets the answer rather than a reset), and a body
  within the limit reaches the application unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

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
    """ASGI middleware: ``/v1/`` requests without ``Authorization: Bearer <api_key>`` get a 401."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            if not key_matches(given.decode("latin-1"), self.api_key):
                await _error(send, 401, "missing or wrong API key (send Authorization: Bearer <key>)",
                             kind="authentication_error", code="invalid_api_key")
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: HTTP request bodies over ``limit`` bytes get a 413 with an OpenAI error body."""

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
            if declared - self.limit <= _DRAIN_BYTES and not await _drain(receive, _DRAIN_BYTES):
                return  # the client went away
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
                if message.get("more_body", False) and not await _drain(receive, _DRAIN_BYTES):
                    return
                await _error(send, 413, self._too_large(size, at_least=True))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    def _too_large(self, size: int, *, at_least: bool = False) -> str:
        return (f"the request body has {'more than ' if at_least else ''}{size:,} bytes, over this server's limit of "
                f"{self.limit:,} (reattention serve --max-request-bytes)")


# Past the limit, up to this many more bytes are read and dropped before the 413 is sent: a client
# that is still uploading when the server answers and closes may see a reset instead of the answer.
_DRAIN_BYTES = 16 << 20


async def _drain(receive: Receive, budget: int) -> bool:
    """Read and drop the rest of a request body (at most ``budget`` bytes); False if the client left."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return True


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


async def _error(send: Send, status: int, message: str, *, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
    code = code or ("request_too_large" if status == 413 else None)
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
