"""The one generation loop: after a prompt's prefill, choose a token, hand it out, feed it back.

Every generation runs it: the engine's ``generate``/``stream`` (tokens sampled and turned into
text), its warm-up (greedy tokens, discarded) and the sharded engine (rank 0 samples and tells the
other ranks each token before feeding it; they take the tokens it sends). What differs is only
how a token is chosen (`choose`) and what must happen before it is fed back (`before_decode`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Protocol

import torch

from reattention_core.generation.cuda_graph import StepGraph
from reattention_core.generation.prefill import run_prefill
from reattention_core.generation.sampling import Sampler
from reattention_core.hf import ReAttentionCache
from reattention_core.hf._compat import cache_argument

# Picks the next token from fp32 logits ``[1, V]``; ``None`` ends the generation.
Choose = Callable[[torch.Tensor], "int | None"]


class Steps(Protocol):
    """The forward passes of one generation over its cache."""

    def prefill(
        self,
        ids: torch.Tensor,
        *,
        start: int = 0,
        last_alone: bool = True,
        breaks: Sequence[int] = (),
        on_chunk: Callable[[int], None] | None = None,
        progress: bool | None = None,
        desc: str = "prefill",
    ) -> torch.Tensor | None:
        """Run ``ids [1, N]`` from token ``start`` on (`run_prefill`); fp32 logits ``[1, V]`` of the last."""
        ...

    def decode(self, token: int) -> torch.Tensor:
        """Feed one token; fp32 logits ``[1, V]`` of the next."""
        ...


class ModelSteps:
    """`Steps` of ``model`` over ``cache``: prefill chunks of ``chunk_size`` tokens and one-token decode
    steps, through step graphs where given (`reattention_core.generation.cuda_graph.GraphPolicy`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: ReAttentionCache,
        chunk_size: int,
        *,
        prefill_graph: StepGraph | None = None,
        decode_graph: StepGraph | None = None,
    ) -> None:
        self.model, self.cache, self.chunk_size = model, cache, chunk_size
        self.prefill_graph, self.decode_graph = prefill_graph, decode_graph

    def prefill(
        self,
        ids: torch.Tensor,
        *,
        start: int = 0,
        last_alone: bool = True,
        breaks: Sequence[int] = (),
        on_chunk: Callable[[int], None] | None = None,
        progress: bool | None = None,
        desc: str = "prefill",
    ) -> torch.Tensor | None:
        return run_prefill(
            self.model, ids, self.cache, self.chunk_size, start=start, last_alone=last_alone, progress=progress,
            desc=desc, on_chunk=on_chunk, breaks=breaks, graph=self.prefill_graph,
        )  # fmt: skip

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        if self.decode_graph is not None:
            return self.decode_graph.step_token(token)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[token]], device=device)
        out = self.model(input_ids=ids, **cache_argument(self.model, self.cache), use_cache=True)
        return out.logits[:, -1].float()


def decode_tokens(
    steps: Steps,
    logits: torch.Tensor,
    choose: Choose,
    max_new_tokens: int,
    *,
    before_decode: Callable[[int], None] | None = None,
) -> Iterator[int]:
    """Up to ``max_new_tokens`` tokens after a prefill whose last logits are ``logits [1, V]``.

    Each token is chosen from the last logits (``None``: stop, nothing yielded), yielded, and fed
    back unless it is the last one allowed; ``before_decode`` runs right before it is fed. A consumer
    that stops pulling (a stop string) ends the generation there: nothing more runs.
    """
    for step in range(max_new_tokens):
        token = choose(logits)
        if token is None:
            return
        yield token
        if step + 1 < max_new_tokens:
            if before_decode is not None:
                before_decode(token)
            logits = steps.decode(token)


def sampled(sampler: Sampler, eos_ids: Collection[int]) -> Choose:
    """Choose by ``sampler``; an end-of-sequence token ends the generation."""

    def choose(logits: torch.Tensor) -> int | None:
        token = sampler(logits[0])
        return None if token in eos_ids else token

    return choose


def greedy(logits: torch.Tensor) -> int:
    """The most likely token (warm-up)."""
    return int(logits[0].argmax())
