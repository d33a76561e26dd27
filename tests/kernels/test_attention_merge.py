"""Split scope attention whose last program per (sequence, KV head) merges the partial outputs.

With ``fuse_merge`` (`KernelOptions.fuse_decode_merge`, off by default), a split launch of
at most ``_FUSED_MERGE_MAX_ROWS`` rows per KV head merges in its last program (`arrivals`) instead
of the merge kernel: outputs and log-sum-exps must equal the merge kernel's and the reference's, the
merge kernel must not run, and every arrival count must be back at zero after each launch.
"""

from __future__ import annotations

import pytest
import torch

from reattention_kernels.reference import scope_attention_ref
from reattention_kernels.triton_ops.arrivals import counts_are_zero
from tests.kernels.test_attention import TOL, make_inputs


@pytest.fixture
def merge_in_the_last_program():
    """The Triton attention module; the tests ask it for ``fuse_merge=True``."""
    from reattention_kernels.triton_ops import attention

    return attention


def refuse_merge_kernel(monkeypatch, attention) -> None:
    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("the merge kernel ran where the last program should merge")

    monkeypatch.setattr(attention, "scope_attention_fwd_kernel_merge", Refused())


# (B, TQ, HQ, H, D, dtype, splits, return_lse): rows per KV head = TQ x HQ / H
CASES = [
    (1, 1, 9, 3, 64, "fp32", 5, True),  # the embedded model's decode step
    (2, 1, 32, 8, 128, "fp16", 7, False),  # Llama-8B's group of 4, two sequences
    (2, 1, 4, 4, 64, "fp32", 2, True),  # MHA-like, one row per KV head
    (1, 2, 8, 2, 64, "fp16", 3, True),  # two query tokens: 8 rows, still merged in the program
    (1, 1, 9, 3, 64, "fp32", 40, True),  # more splits than the scope has tiles for (some see no key)
]


@pytest.mark.parametrize(
    ("b", "tq", "hq", "h", "d", "dtype", "splits", "return_lse"),
    [pytest.param(*c, id="B{}-TQ{}-HQ{}-H{}-D{}-{}-s{}-lse{}".format(*c)) for c in CASES],
)
def test_the_last_program_merges_the_splits(
    b, tq, hq, h, d, dtype, splits, return_lse, device, merge_in_the_last_program, monkeypatch
):
    attention = merge_in_the_last_program
    torch.manual_seed(splits)
    n_sel = (37, 5)[:b]
    q, k, v, sel, n, kwargs = make_inputs(b, tq, 300, hq, h, d, dtype, 4, 260, n_sel, 40, "cpu")
    q, k, v, sel, n = (x.to(device) for x in (q, k, v, sel, n))
    kwargs["inv_freq"] = kwargs["inv_freq"].to(device)
    want_o, want_lse = attention.scope_attention_fwd(q, k, v, sel, n, return_lse=return_lse, splits=splits, **kwargs)
    refuse_merge_kernel(monkeypatch, attention)
    for _ in range(2):  # a second launch starts from the counts the first left
        o, lse = attention.scope_attention_fwd(
            q, k, v, sel, n, return_lse=return_lse, fuse_merge=True, splits=splits, **kwargs
        )
        assert counts_are_zero()
        # the same merge arithmetic in another program: equal up to the reduction's order
        torch.testing.assert_close(o, want_o, atol=1e-6, rtol=1e-6)
        ro, rlse = scope_attention_ref(q, k, v, sel, n, return_lse=return_lse, **kwargs)
        torch.testing.assert_close(o, ro, **TOL[dtype])
        if return_lse:
            torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(lse, rlse, atol=1e-3 if dtype == "fp32" else 2e-2, rtol=1e-4)
        else:
            assert lse is None


def test_a_shifted_step_merges_over_the_moved_window(device, merge_in_the_last_program, monkeypatch) -> None:
    """A CUDA-graph decode step's launch: the store grew by ``shift`` since it was recorded."""
    attention = merge_in_the_last_program
    refuse_merge_kernel(monkeypatch, attention)
    torch.manual_seed(5)
    q, k, v, sel, n, kwargs = make_inputs(1, 1, 300, 9, 3, 64, "fp32", 4, 200, (30,), 30, device)
    for grown in (0, 1, 40):
        shift = torch.tensor([grown], dtype=torch.int64, device=device)
        o, lse = attention.scope_attention_fwd(
            q, k, v, sel, n, return_lse=True, length=250, shift=shift, fuse_merge=True, splits=6, **kwargs
        )
        moved = dict(kwargs, local_start=200 + grown)
        ro, rlse = scope_attention_ref(q, k[:, : 250 + grown], v[:, : 250 + grown], sel, n, return_lse=True, **moved)
        torch.testing.assert_close(o, ro, **TOL["fp32"])
        torch.testing.assert_close(lse, rlse, atol=1e-3, rtol=1e-4)
    assert counts_are_zero()


@pytest.mark.parametrize("case", ["many rows", "one split", "switched off"])
def test_other_launches_keep_the_merge_kernel(case, device, monkeypatch) -> None:
    """A split prefill chunk (more rows than one program should merge) and an unsplit launch take the
    old paths even with the switch on; with it off, every split launch takes the merge kernel."""
    from reattention_kernels.triton_ops import attention

    asked = []
    real = attention.arrival_counts
    monkeypatch.setattr(attention, "arrival_counts", lambda *a: asked.append(a) or real(*a))
    tq, splits = {"many rows": (7, 3), "one split": (1, 1), "switched off": (1, 3)}[case]
    torch.manual_seed(2)
    q, k, v, sel, n, kwargs = make_inputs(1, tq, 120, 8, 2, 64, "fp32", 4, 90, (20,), 20, device)
    fuse = case != "switched off"
    o, lse = attention.scope_attention_fwd(q, k, v, sel, n, return_lse=True, fuse_merge=fuse, splits=splits, **kwargs)
    ro, rlse = scope_attention_ref(q, k, v, sel, n, return_lse=True, **kwargs)
    torch.testing.assert_close(o, ro, **TOL["fp32"])
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    assert asked == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_graph_replays_merge_in_the_last_program_on_the_gpu(dtype, merge_in_the_last_program, monkeypatch) -> None:
    """The embedded model's decode step over a full scope (64 + 1024 + 256), default split count,
    recorded in a CUDA graph and replayed while the store grows: the GPU's atomics and ordering."""
    attention = merge_in_the_last_program
    refuse_merge_kernel(monkeypatch, attention)
    torch.manual_seed(0)
    q, k, v, sel, n, kwargs = make_inputs(1, 1, 40_000, 9, 3, 64, dtype, 64, 30_000, (1024,), 1024, "cuda")
    shift = torch.zeros(1, dtype=torch.int64, device="cuda")

    def step():
        return attention.scope_attention_fwd(
            q, k, v, sel, n, return_lse=True, length=30_256, shift=shift, fuse_merge=True, **kwargs
        )

    step()  # compiles (and makes the counts) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, lse = step()
    for grown in (0, 1, 500):
        shift.fill_(grown)
        for _ in range(3):
            graph.replay()
            moved = dict(kwargs, local_start=30_000 + grown)
            end = 30_256 + grown
            ro, rlse = scope_attention_ref(q, k[:, :end], v[:, :end], sel, n, return_lse=True, **moved)
            torch.testing.assert_close(o, ro, **TOL[dtype])
            torch.testing.assert_close(lse, rlse, atol=1e-3 if dtype == "fp32" else 2e-2, rtol=1e-4)
    assert counts_are_zero()
