"""`ShardedEngine`: one `ReAttentionEngine` per rank, the KV store split across the ranks.

Every rank runs every forward pass over its shard (`reattention_core.store.sharded`), so tokens equal
the single-device engine's; rank 0 leads (tokenises, samples, broadcasts). Launch one process per GPU
with ``torchrun --nproc-per-node N -m reattention_core.distributed "..."``. No prefix cache here.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from reattention_core.engine import GenerationResult, ReAttentionEngine
from reattention_core.errors import DistributedError, ReAttentionError
from reattention_core.generation.loop import ModelSteps, Steps, decode_tokens, sampled
from reattention_core.generation.sampling import Sampler, SamplingParams
from reattention_core.generation.text import TextAssembler
from reattention_core.hf import ReAttentionCache, enable_reattention
from reattention_core.hf.architectures import model_config
from reattention_core.store.sharded import ShardedKVStore, ShardLayout

T = TypeVar("T")

# First element of every job broadcast.
_RUN, _SKIP, _IDLE, _SHUTDOWN = "run", "skip", "idle", "shutdown"


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment; the device for this rank.

    NCCL with one GPU per local rank when CUDA is available, else gloo on the CPU.
    """
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise DistributedError("no process group: launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR)")
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=datetime.timedelta(seconds=timeout_s))
    return device


class ShardedEngine:
    """Generation over a KV store sharded across the ranks of ``group``.

    Only the KV store is sharded; each attention layer combines the shards with two collectives
    (`reattention_core.store.sharded.ShardLayer`). Rank 0 tokenises and validates the prompt,
    broadcasts the token ids and sampling settings, samples every token and broadcasts it with a
    "go on" flag; the other ranks follow. A sharded corpus is prefilled on every request.

    Args:
        engine: this rank's engine (same model, tokenizer and config on every rank).
        group: the process group (default: the world).
        keepalive_s: while serving, rank 0 sends an idle message this often, so the ranks
            waiting for the next job never reach the process group's timeout (keep it well
            below it; `init_from_env` sets 30 minutes).

    Every rank calls the same methods in the same order (`generate` on all ranks), or rank 0
    serves (`run`, used by ``reattention serve`` under torchrun) while the others call
    `follow` until rank 0 calls `shutdown`.
    """

    def __init__(
        self, engine: ReAttentionEngine, group: dist.ProcessGroup | None = None, *, keepalive_s: float = 60.0
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("torch.distributed is not initialised; call init_from_env() (under torchrun) first")
        self.engine = engine
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        nccl = dist.get_backend(group) == "nccl"
        self._comm_device = engine.device if nccl else torch.device("cpu")
        self._failure: BaseException | None = None
        self.keepalive_s = keepalive_s

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def generate(
        self,
        prompt: Any = None,
        *,
        sampling: SamplingParams | None = None,
        context: str | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> GenerationResult | None:
        """Generate on every rank; rank 0's arguments count (`ReAttentionEngine.generate`'s).

        Returns:
            the `GenerationResult` on rank 0, ``None`` on the others.
        """
        if not self.is_leader:
            self.follow(once=True)
            return None
        try:
            request = self.engine.prepare(prompt, sampling=sampling, context=context, **options)
            ids, params = list(request.ids), request.params
        except ReAttentionError:
            self._broadcast_job((_SKIP,))
            raise
        run = self.run(ids, params, progress=progress, boundary=request.context_tokens)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def run(
        self, ids: list[int], params: SamplingParams, *, progress: bool | None = None, boundary: int | None = None
    ) -> Generator[str, None, GenerationResult]:
        """Rank 0: broadcast a validated job, then generate it (a generator like `ReAttentionEngine.start`'s stream).

        Text deltas are yielded; the `GenerationResult` is the ``StopIteration`` value. Closing
        the generator early (a client went away) tells the other ranks to stop too.
        ``boundary``: a ``context=`` prompt's corpus end (`Request.context_tokens`), where prefill
        breaks its chunks as the single-device engine does, so both give the same tokens.
        """
        if not self.is_leader:
            raise DistributedError("only rank 0 leads generations; the other ranks call follow()")
        self._check()
        self._broadcast_job((_RUN, ids, params, boundary))
        return self._lead(ids, params, progress, boundary)

    def keepalive(self) -> None:
        """Rank 0, while idle: show the waiting ranks that it is alive (a failure raises `DistributedError`)."""
        if self.is_leader:
            self._check()
            self._broadcast_job((_IDLE,))

    def shutdown(self) -> None:
        """Rank 0: release the ranks waiting in `follow`."""
        if self.is_leader and self._failure is None:
            self._broadcast_job((_SHUTDOWN,))

    def _lead(
        self, ids: list[int], params: SamplingParams, progress: bool | None, boundary: int | None
    ) -> Generator[str, None, GenerationResult]:
        text = TextAssembler(self.engine.tokenizer, params.stop)
        with self._session(ids, params, progress, boundary) as (steps, logits):
            told = False
            try:
                choose = sampled(Sampler(params), self.engine._eos_ids)
                tell = functools.partial(self._send, more=True)  # the followers feed the same token
                yield from text.stream(decode_tokens(steps, logits, choose, params.max_new_tokens, before_decode=tell))
                self._send(0, more=False)
                told = True
            finally:
                if not told and self._failure is None:
                    self._send(0, more=False)  # closed early: the followers stop at the same step
        tail = text.finish()
        if tail:
            yield tail
        return text.result(prompt_tokens=len(ids), cached_tokens=0, max_new_tokens=params.max_new_tokens)

    def follow(self, *, once: bool = False) -> None:
        """Ranks > 0: run rank 0's jobs until it shuts down (``once``: a single job)."""
        while True:
            job = self._broadcast_job(None)
            if job[0] == _SHUTDOWN:
                return
            if job[0] == _IDLE:
                continue
            if job[0] == _RUN:
                _, ids, params, boundary = job
                with self._session(ids, params, False, boundary) as (steps, logits):
                    for _ in decode_tokens(steps, logits, self._leaders_token, params.max_new_tokens):
                        pass
            if once:
                return

    @contextmanager
    def _session(
        self, ids: list[int], params: SamplingParams, progress: bool | None, boundary: int | None = None
    ) -> Iterator[tuple[Steps, torch.Tensor]]:
        """Hold the engine, shard a fresh store, prefill ``ids``; yields the steps and the prompt's logits."""
        eng = self.engine
        reserve = len(ids) + params.max_new_tokens
        layout = ShardLayout.balanced(reserve, self.rank, self.world)
        store = ShardedKVStore(model_config(eng.model).num_hidden_layers, layout, self.group)
        store.reserve(reserve)
        with eng._lock, enable_reattention(eng.model, eng.config, kernel_options=eng.kernel_options):
            steps = _GuardedSteps(ModelSteps(eng.model, ReAttentionCache(store), eng.config.prefill_chunk_size), self)
            input_ids = torch.tensor([ids], device=eng.device)
            logits = steps.prefill(input_ids, progress=progress, breaks=() if boundary is None else (boundary,))
            assert logits is not None  # the last prompt token runs alone
            yield steps, logits

    def _leaders_token(self, logits: torch.Tensor) -> int | None:
        """A follower's choice: the token rank 0 sends (``None`` once it says the generation is over)."""
        token, more = self._recv()
        return token if more else None

    def _guarded(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a step that includes collectives; a failure poisons the engine (the group is unusable)."""
        self._check()
        try:
            return fn(*args, **kwargs)
        except ReAttentionError:
            raise
        except Exception as exc:
            self._failure = exc
            raise DistributedError(
                f"rank {self.rank}: a collective failed ({type(exc).__name__}: {exc}); another rank has probably died. "
                "This engine cannot answer from a partial store: restart the whole torchrun job."
            ) from exc

    def _check(self) -> None:
        if self._failure is not None:
            raise DistributedError(
                f"an earlier collective failed on rank {self.rank} ({self._failure}); restart the whole torchrun job"
            )

    def _broadcast_job(self, job: tuple | None) -> tuple:
        box: list[Any] = [job]  # rank 0's job on every rank once broadcast
        self._guarded(dist.broadcast_object_list, box, src=self._src, group=self.group)
        return box[0]

    def _send(self, token: int, *, more: bool) -> None:
        ctrl = torch.tensor([token, int(more)], dtype=torch.int64, device=self._comm_device)
        self._guarded(dist.broadcast, ctrl, src=self._src, group=self.group)

    def _recv(self) -> tuple[int, bool]:
        ctrl = torch.empty(2, dtype=torch.int64, device=self._comm_device)
        self._guarded(dist.broadcast, ctrl, src=self._src, group=self.group)
        return int(ctrl[0]), bool(ctrl[1])


class _GuardedSteps:
    """`Steps` whose forward passes (each runs collectives) go through `ShardedEngine._guarded`."""

    def __init__(self, steps: ModelSteps, owner: ShardedEngine) -> None:
        self.steps, self.owner = steps, owner

    def prefill(self, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        return self.owner._guarded(self.steps.prefill, ids, **kwargs)

    def decode(self, token: int) -> torch.Tensor:
        return self.owner._guarded(self.steps.decode, token)
