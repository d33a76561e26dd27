"""`GenerationWorker`: one thread that runs the engine's generations one at a time.

The engine's `RLock` is held for a generation's whole life and only its taker can release it, so a
generation is started, driven and closed in the worker's thread; requests queue a `Job` and receive
its events through a callback (see `GenerationWorker`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from reattention_core.engine import GenerationResult, ReAttentionEngine
from reattention_core.errors import DistributedError, ReAttentionError
from reattention_core.generation.request import Request
from reattention_core.generation.sampling import SamplingParams

log = logging.getLogger("reattention")


@dataclass(frozen=True)
class Piece:
    """A text delta of the completion."""

    text: str


@dataclass(frozen=True)
class Done:
    """The generation ended (normally, on a stop, or at the token limit)."""

    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    """The generation raised; ``error`` is the exception."""

    error: BaseException


Event = Piece | Done | Failed


@dataclass
class Job:
    """One generation: token ids and sampling settings (already validated), where events go."""

    ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class QueueFull(ReAttentionError):
    """More jobs are waiting than the worker accepts."""


class PieceStream(Iterator[str], Protocol):
    """Text deltas whose ``StopIteration`` value is the `GenerationResult`; ``close`` ends it early."""

    def close(self) -> None: ...


class Backend(Protocol):
    """What runs the generations: the engine itself, or a `ShardedEngine` on rank 0."""

    @property
    def keepalive_s(self) -> float | None:
        """Call `keepalive` after this many idle seconds (``None``: never)."""

    def run(self, ids: list[int], params: SamplingParams) -> PieceStream:
        """A generator of text deltas; its ``StopIteration`` value is the `GenerationResult`."""

    def keepalive(self) -> None:
        """Tell whoever waits on this backend that it is still there (e.g. ranks blocked in a collective)."""


class EngineBackend:
    """The single-process backend: `ReAttentionEngine.start`, whose stream ends with the result."""

    keepalive_s = None

    def __init__(self, engine: ReAttentionEngine) -> None:
        self.engine = engine

    def run(self, ids: list[int], params: SamplingParams) -> PieceStream:
        return self.engine.start(Request(ids=tuple(ids), params=params), progress=False)

    def keepalive(self) -> None:
        return None


class GenerationWorker:
    """Serialises generations through one engine in one daemon thread.

    A job's events (text pieces, then the result or an error) arrive through its callback, in order.
    Setting ``job.cancel`` (the client went away) closes the generator at its next piece, in this
    thread, which releases the lock and truncates the prefix-cache store; the worker goes on to the
    next job.

    Args:
        engine: the engine every job runs on.
        max_pending: jobs that may wait behind the running one; `submit` raises `QueueFull` beyond.
        backend: what runs each job (default: `EngineBackend(engine)`; a sharded deployment
            passes its `ShardedEngine`, whose `keepalive` the worker calls while idle so the
            ranks waiting for the next job do not hit the process group's timeout).
    """

    def __init__(self, engine: ReAttentionEngine, max_pending: int = 16, backend: Backend | None = None) -> None:
        self.engine = engine
        self.backend: Backend = EngineBackend(engine) if backend is None else backend
        self.broken: DistributedError | None = None  # set once a sharded generation lost a rank
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_pending)
        self._busy = threading.Event()
        self.completed = 0  # generations that ran to their end
        self.cancelled = 0  # generations stopped because their client went away
        self._thread = threading.Thread(target=self._loop, name="reattention-generation", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self._busy.is_set()

    @property
    def pending(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._jobs.maxsize} requests are already waiting; retry later") from None

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop after the running job (waiting jobs are cancelled)."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit(Failed(RuntimeError("the server is shutting down")))
        self._jobs.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.backend.keepalive_s)
            except queue.Empty:
                self._keepalive()
                continue
            if job is None:
                return
            if job.cancel.is_set():
                continue
            self._busy.set()
            try:
                self._run(job)
            finally:
                self._busy.clear()

    def _run(self, job: Job) -> None:
        event: Event | None = None
        try:
            gen = self.backend.run(job.ids, job.params)
        except Exception as exc:  # noqa: BLE001 - reported to the request, the worker keeps serving
            _log_failure(exc)
            self._note(exc)
            job.emit(Failed(exc))
            return
        try:
            while not job.cancel.is_set():
                try:
                    piece = next(gen)
                except StopIteration as stop:
                    event = Done(stop.value)
                    break
                job.emit(Piece(piece))
        except Exception as exc:  # noqa: BLE001 - reported to the request, the worker keeps serving
            _log_failure(exc)
            event = Failed(exc)
        finally:
            gen.close()  # in this thread: releases the engine lock, restores the cached store
        if event is None:
            self.cancelled += 1
        else:
            self.completed += isinstance(event, Done)
            job.emit(event)

    def _keepalive(self) -> None:
        if self.broken is not None:
            return
        try:
            self.backend.keepalive()
        except Exception as exc:
            log.exception("keepalive failed")
            self._note(exc)

    def _note(self, exc: Exception) -> None:
        if isinstance(exc, DistributedError):
            self.broken = exc  # the store is incomplete from now on: refuse everything


def _log_failure(exc: Exception) -> None:
    """A typed error (a request too large for memory, a lost rank) is logged as such; anything else with its
    traceback."""
    if isinstance(exc, ReAttentionError):
        log.warning("generation failed: %s: %s", type(exc).__name__, exc)
    else:
        log.exception("generation failed")


def params_for(engine: ReAttentionEngine, kwargs: dict[str, Any]) -> tuple[list[int], SamplingParams]:
    """Validate a request's generation arguments and tokenise its prompt (raises `InvalidInputError`)."""
    prompt = kwargs.pop("prompt")
    context = kwargs.pop("context", None)
    request = engine.prepare(prompt, context=context, **kwargs)
    return list(request.ids), request.params
