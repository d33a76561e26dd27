"""`select_from_hits_triton` against `select_from_hits_ref`: outputs must be exactly equal."""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import KernelOptions, select_from_hits
from reattention_kernels.reference import select_from_hits_ref


def random_hits(b: int, n: int, middle: int, *, distinct: int, empty: float, seed: int, device: str) -> torch.Tensor:
    """Hits drawn from ``distinct`` positions (so positions repeat and votes tie), some ``-1``."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(middle, generator=g)[: max(1, min(distinct, middle))]
    hits = pool[torch.randint(0, len(pool), (b, n), generator=g)]
    hits[torch.rand(b, n, generator=g) < empty] = -1
    return hits.to(device)


# (B, N, middle_len, max_blocks, block_size, distinct positions, share of -1, offset)
CASES = [
    (1, 36, 5000, 32, 32, 20, 0.0, 32),  # a decode step of the preset: fewer distinct hits than blocks
    (1, 36, 5000, 8, 32, 36, 0.0, 0),  # more distinct hits than blocks: clipping decides
    (2, 300, 700, 16, 7, 40, 0.1, 5),  # odd block, ties between votes, empty slots, two rows
    (1, 1100, 90, 4, 16, 60, 0.2, 0),  # several tiles of hits; blocks clipped at both ends and merged
    (1, 5, 3, 32, 6, 3, 0.0, 1),  # a middle shorter than a block; K = N < max_blocks
    (3, 64, 1, 2, 4, 1, 0.5, 2),  # a one-token middle
    (1, 10, 50, 6, 1, 10, 1.0, 7),  # no hit at all
    (1, 2000, 3000, 32, 4, 500, 0.05, 3),  # three rounds of tile reduction (16 tiles, then 4, then 1)
    (2, 1, 40, 32, 8, 1, 0.0, 0),  # a single hit
    (1, 256, 400, 32, 32, 30, 0.1, 0),  # Llama-3.1-8B's decode step (32 heads x top-8)
    (2, 64, 1000, 16, 16, 50, 0.0, 32),  # the most hits the one-program path takes, more distinct ones than blocks
]


@pytest.mark.parametrize("b, n, middle, max_blocks, block, distinct, empty, offset", CASES)
def test_fused_selection_equals_the_reference(
    device, selection_path, b, n, middle, max_blocks, block, distinct, empty, offset
):
    for seed in range(3):
        hits = random_hits(b, n, middle, distinct=distinct, empty=empty, seed=seed, device=device)
        sel, n_sel = select_from_hits(hits, middle, max_blocks, block, offset, kernel_options=selection_path)
        ref_sel, ref_n = select_from_hits_ref(hits, middle, max_blocks, block, offset)
        assert sel.dtype == n_sel.dtype == torch.int64 and sel.shape == ref_sel.shape
        assert torch.equal(n_sel, ref_n) and torch.equal(sel, ref_sel), f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("n, middle", [(36, 1 << 20), (9216, 1 << 20), (32768, 131072)])
def test_fused_selection_at_real_shapes(n, middle):
    """A decode step and a 256-token prefill chunk of the SmolLM2 preset over a 1M-token middle, and a
    Llama-8B-shaped chunk (32 query heads): the GPU's atomics, not the interpreter's."""
    for seed in range(3):
        hits = random_hits(1, n, middle, distinct=n // 3, empty=0.01, seed=seed, device="cuda")
        got = select_from_hits(hits, middle, 32, 32, 32, kernel_options=KernelOptions(backend="triton"))
        want = select_from_hits_ref(hits, middle, 32, 32, 32)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
