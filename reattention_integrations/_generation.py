"""Framework-neutral generation helpers shared by the LangChain and LlamaIndex adapters.

`Sampling` and `generation_events` describe one call; `iterate_in_thread` / `call_in_thread` run a
generation in one worker thread for async callers (the engine's `RLock` must be released by the
thread that took it, so one generator never hops between pool threads).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from reattention_core.engine import ReAttentionEngine
from reattention_core.errors import InvalidInputError
from reattention_core.generation.request import GenerationResult, TextStream
from reattention_core.generation.sampling import SamplingParams
from reattention_core.prompts import Prompt

T = TypeVar("T")
# Starts a generation when called (in the thread that will drive it): text pieces, then the result.
Events = Generator["str | GenerationResult", None, None]
EventSource = Callable[[], Events]

# Call-level options an adapter accepts (e.g. ``llm.invoke(q, max_tokens=8, context=corpus)``).
CALL_OPTIONS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "context", "progress")


@dataclass(frozen=True)
class Sampling:
    """How one call samples. The engine validates the values (`InvalidInputError` with a hint)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def params(self) -> SamplingParams:
        """The engine's `SamplingParams` for these settings (validated there)."""
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
        )


def merge_stop(*sources: str | Iterable[str] | None) -> tuple[str, ...]:
    """Stop strings from every source (field, call), in order, without duplicates."""
    merged: list[str] = []
    for source in sources:
        if source is None:
            continue
        for s in [source] if isinstance(source, str) else source:
            if not isinstance(s, str) or not s:
                raise InvalidInputError(f"stop sequences must be non-empty strings, got {s!r}")
            if s not in merged:
                merged.append(s)
    return tuple(merged)


def split_call_options(kwargs: dict[str, Any], *, model_name: str, owner: str) -> dict[str, Any]:
    """The recognised call-level options of ``kwargs``; anything else is a typed error.

    ``model=`` naming another model is refused rather than ignored: one adapter serves one engine.
    """
    options: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in CALL_OPTIONS:
            if value is not None:
                options[key] = value
        elif key == "model":
            if value not in (None, model_name):
                raise InvalidInputError(
                    f"{owner} serves {model_name!r} and cannot switch to model={value!r} per call; create another "
                    f"{owner}(model={value!r}) instead (instances with equal settings share one loaded model)"
                )
        else:
            raise InvalidInputError(
                f"{owner} got an unknown option {key!r}; call options are: {', '.join(CALL_OPTIONS)}"
            )
    return options


def generation_events(
    engine: ReAttentionEngine,
    prompt: Prompt,
    *,
    sampling: Sampling,
    context: str | None = None,
    progress: bool | None = None,
) -> Events:
    """Text pieces as they are generated, then one `GenerationResult` (usage, finish reason, cache).

    The prompt is encoded and checked now (bad input raises here, before any iteration). Drive
    the iterator to the end or close it, from one thread.
    """
    request = engine.prepare(prompt, sampling=sampling.params(), context=context)
    return _then_result(engine.start(request, progress=progress))


def _then_result(stream: TextStream) -> Events:
    with stream:  # closing this generator closes the stream, in the same thread
        yield from stream
    assert stream.result is not None
    yield stream.result


async def iterate_in_thread(factory: Callable[[], Iterable[T]]) -> AsyncIterator[T]:
    """Create an iterable with ``factory()`` in a new thread and yield its items on the event loop.

    The loop stays free while the thread works. If the consumer stops early (``break``, task
    cancelled), the thread stops after its next item and closes the iterator itself. Exceptions
    (including those raised by ``factory``) are re-raised in the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    abandoned = threading.Event()
    end = object()

    def put(item: tuple[bool, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            abandoned.set()

    def work() -> None:
        try:
            items = iter(factory())
            try:
                for item in items:
                    put((True, item))
                    if abandoned.is_set():
                        break
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((False, exc))
        else:
            put((False, end))

    threading.Thread(target=work, name="reattention-generate", daemon=True).start()
    try:
        while True:
            is_item, value = await queue.get()
            if is_item:
                yield value
            elif value is end:
                return
            else:
                raise value
    finally:
        abandoned.set()


async def call_in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread, awaited without blocking the loop (why a new thread: see the module)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, failed: bool) -> None:
        if not future.cancelled():
            future.set_exception(value) if failed else future.set_result(value)

    def work() -> None:
        value: T | BaseException
        try:
            value, failed = fn(), False
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            value, failed = exc, True
        try:
            loop.call_soon_threadsafe(settle, value, failed)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=work, name="reattention-generate", daemon=True).start()
    return await future
