"""`create_app`: the FastAPI application of ``reattention serve``.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both stream with
``"stream": true`` as server-sent events ``data: {...}`` ending with ``data: [DONE]``),
``GET /v1/models``, ``GET /health``. Generations run one at a time on a `GenerationWorker`; the
event loop only validates, tokenises (in a thread) and relays pieces.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reattention_core.app.serving.guards import ApiKeyCheck, BodyLimit, PromptBound
from reattention_core.app.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    _Sampling,
)
from reattention_core.app.serving.worker import (
    Backend,
    Done,
    Event,
    Failed,
    GenerationWorker,
    Job,
    Piece,
    QueueFull,
    params_for,
)
from reattention_core.engine import ReAttentionEngine
from reattention_core.errors import ContextLimitError, DistributedError, InvalidInputError, StoreMemoryError


@dataclass(frozen=True)
class AppConfig:
    """Settings of the HTTP application.

    Args:
        model_name: the id clients pass as ``model`` and ``/v1/models`` lists (default: the engine's).
        api_key: when set, requests must send ``Authorization: Bearer <api_key>``.
        default_max_tokens: completion length when a chat request gives no ``max_tokens``.
        max_pending: requests that may wait for the running generation (then 429).
        max_request_bytes: largest request body accepted (then 413); the default, 64 MiB, holds a
            ``context`` of several million tokens.
    """

    model_name: str | None = None
    api_key: str | None = None
    default_max_tokens: int = 256
    max_pending: int = 16
    max_request_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name, low in (("default_max_tokens", 1), ("max_pending", 0), ("max_request_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(f"AppConfig.{name} must be an int >= {low}, got {value!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise InvalidInputError("AppConfig.api_key must be a non-empty string or None")


def create_app(
    engine: ReAttentionEngine, config: AppConfig | None = None, *, backend: Backend | None = None
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine``; its worker thread stops at app shutdown.

    ``backend``: see `GenerationWorker` (a sharded deployment passes its `ShardedEngine` on rank 0).
    """
    config = config or AppConfig()
    model_name = config.model_name or engine.model_name
    worker = GenerationWorker(engine, max_pending=config.max_pending, backend=backend)
    bound = PromptBound(engine.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="reattention", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    if config.api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(ApiKeyCheck, api_key=config.api_key)
    app.state.worker = worker
    app.state.model_name = model_name

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "dead" if not worker.alive else "broken" if worker.broken else "ok"
        body = {
            "status": status,
            "model": model_name,
            "error": str(worker.broken) if worker.broken else None,
            "busy": worker.busy,
            "pending": worker.pending,
            "completed": worker.completed,
            "cancelled": worker.cancelled,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, model_name)
        return _model_card(model_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await _complete(body, body.prompt(), ResponseShape(True, model_name))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(body, body.text(), ResponseShape(False, model_name))

    async def _complete(body: _Sampling, prompt: Any, shape: ResponseShape):
        _check_model(body.model, model_name)
        kwargs = body.engine_kwargs(config.default_max_tokens)
        kwargs["prompt"] = prompt
        try:
            bound.check(
                _chars(prompt) + len(kwargs["context"] or ""), kwargs["max_new_tokens"], engine.config.max_context
            )
            # tokenising a long corpus takes a while: keep the event loop free
            ids, params = await asyncio.to_thread(params_for, engine, kwargs)
        except ContextLimitError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except InvalidInputError as exc:
            raise APIError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(ids, params, emit=lambda ev: _hand_over(loop, events, ev, job))
        if not worker.alive:
            raise APIError(503, "the generation worker has stopped; restart the server", type="server_error")
        if worker.broken:
            raise APIError(503, str(worker.broken), type="server_error", code="worker_failed")
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error") from None
        if body.stream:
            return StreamingResponse(
                _sse(job, events, shape, body.include_usage()),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                event = await events.get()
                if isinstance(event, Done):
                    return shape.full(event.result)
                if isinstance(event, Failed):
                    raise _failure(event.error)
        finally:
            job.cancel.set()  # no-op once done; stops the generation if this request was cancelled

    return app


async def _sse(job: Job, events: asyncio.Queue[Event], shape: ResponseShape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one streamed generation; a disconnect cancels it (see `Job.cancel`)."""
    try:
        if shape.chat:  # OpenAI opens a chat stream with the role
            yield _data(shape.chunk("", first=True))
        while True:
            event = await events.get()
            if isinstance(event, Piece):
                yield _data(shape.chunk(event.text))
            elif isinstance(event, Done):
                yield _data(shape.chunk(None if shape.chat else "", event.result.finish_reason))
                if include_usage:
                    yield _data(shape.usage_chunk(event.result))
                break
            else:
                err = _failure(event.error)
                yield _data(err.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        # Starlette cancels this generator when the client disconnects; the worker then closes
        # the engine's generator in its own thread and moves on.
        job.cancel.set()


def _chars(prompt: str | list[dict[str, str]]) -> int:
    """Characters of a prompt's text (a string, or the contents of chat messages)."""
    return len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _hand_over(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event], event: Event, job: Job) -> None:
    """Called on the worker thread: pass ``event`` to the request's event loop."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, event)
    except RuntimeError:  # the loop is closed (server shut down): nobody is listening any more
        job.cancel.set()


def _failure(error: BaseException) -> APIError:
    if isinstance(error, InvalidInputError):
        return APIError(400, str(error))
    if isinstance(error, StoreMemoryError):  # prompt + max_tokens is more than this server can hold
        return APIError(
            400,
            f"this request does not fit in the server's memory: {error} Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if isinstance(error, DistributedError):
        return APIError(503, str(error), type="server_error", code="worker_failed")
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404,
            f"model {requested!r} is not served here; this server serves {served!r} (see /v1/models)",
            param="model",
            code="model_not_found",
        )


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "reattention"}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported parameter {param!r}", param=param, code="unsupported_parameter")
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)
