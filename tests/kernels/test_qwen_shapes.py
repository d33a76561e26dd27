"""The kernels at the head shapes of the evaluation's Qwen readers, against the references.

Qwen2.5-Coder-1.5B: 12 query / 2 KV heads of dim 128 (groups of 6); Qwen2.5-0.5B: 14 / 2 of dim 64
(groups of 7, not a power of two). Their engine config (`ReAttentionConfig.for_window(32768)`) has
top-4, 256 blocks of 32 and prefill chunks of 512. Under the interpreter the lengths are small; the
GPU cases run the real ones.
"""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import KernelOptions, scope_attention, score_select, score_topk
from reattention_kernels.reference import scope_attention_ref, score_topk_ref, select_from_hits_ref
from reattention_kernels.triton_ops.arrivals import counts_are_zero
from tests.kernels.test_attention import TOL, make_inputs
from tests.kernels.test_topk import DTYPES, make_keys, make_queries

# name: (HQ, H, D)
QWEN = {"qwen1.5b": (12, 2, 128), "qwen0.5b": (14, 2, 64)}
TOP_K, MAX_BLOCKS, BLOCK = 4, 256, 32
TRITON = KernelOptions(backend="triton")


def selection_ref(q, k, top_k, max_blocks, block, offset, length=None):
    k = k if length is None else k[:, :length]
    hits = score_topk_ref(q, k, top_k)
    return select_from_hits_ref(hits.reshape(hits.shape[0], -1), k.shape[1], max_blocks, block, offset)


def assert_same_hits(out, ref):
    mismatch = (out != ref).any(-1)
    assert not mismatch.any(), f"{int(mismatch.sum())} rows differ; first: {out[mismatch][0]} vs {ref[mismatch][0]}"


@pytest.mark.parametrize("model", list(QWEN))
@pytest.mark.parametrize(("tk", "splits", "kind"), [(300, None, "randn"), (517, 5, "dup"), (260, 3, "int")])
def test_decode_scan(model, tk, splits, kind, device):
    """One query token: one pass over the key splits, then the split merge (one program per row)."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    hq, h, d = QWEN[model]
    torch.manual_seed(tk)
    q = make_queries(1, 1, hq, d, torch.float32, device, kind)
    k = make_keys(1, tk, h, d, torch.float32, device, kind)
    out = score_topk_fwd(q, k, TOP_K, tuning=TopkTuning(splits=splits))
    assert_same_hits(out, score_topk_ref(q, k, TOP_K))
    assert_same_hits(score_topk(q, k, TOP_K, kernel_options=TRITON), score_topk_ref(q, k, TOP_K))


@pytest.mark.parametrize("model", list(QWEN))
@pytest.mark.parametrize(
    ("tq", "rescore_by", "subtiles", "dtype", "kind"),
    [(5, "rows", 2, "fp32", "int"), (6, "tiles", 1, "fp16", "dup"), (3, "rows", 1, "fp32", "randn")],
)
def test_prefill_scoring_in_two_phases(model, tq, rescore_by, subtiles, dtype, kind, device):
    """A prefill chunk: phase 1's tile (or half-tile) maxima, then phase 2 by rows or by tiles."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    hq, h, d = QWEN[model]
    torch.manual_seed(tq)
    q = make_queries(1, tq, hq, d, DTYPES[dtype], device, kind)
    k = make_keys(1, 301, h, d, DTYPES[dtype], device, kind)
    tuning = TopkTuning(two_phase=True, rescore_by=rescore_by, subtiles=subtiles, splits=2)
    assert_same_hits(score_topk_fwd(q, k, TOP_K, tuning=tuning), score_topk_ref(q, k, TOP_K))


@pytest.mark.parametrize("model", list(QWEN))
@pytest.mark.parametrize("tq", [1, 3])
def test_selection(model, tq, device, selection_path):
    """Scoring and selection of a decode step (48 or 56 hits: the one-program path by default) and of a
    short chunk (the histogram), 256 blocks of 32 clipped to the hits."""
    hq, h, d = QWEN[model]
    torch.manual_seed(tq)
    q = make_queries(1, tq, hq, d, torch.float32, device, "dup")
    k = make_keys(1, 700, h, d, torch.float32, device, "dup")
    sel, n_sel = score_select(q, k, TOP_K, MAX_BLOCKS, BLOCK, 32, kernel_options=selection_path)
    want_sel, want_n = selection_ref(q, k, TOP_K, MAX_BLOCKS, BLOCK, 32)
    assert torch.equal(n_sel, want_n) and torch.equal(sel, want_sel)


@pytest.mark.parametrize("model", list(QWEN))
def test_the_decode_scan_selects_in_its_last_program(model, device, monkeypatch):
    """The selecting epilogue (`KernelOptions.fuse_decode_selection`) fits both models' decode steps
    (2 x 6 or 2 x 7 rows of top-4 hits): the split merge and the separate selection must not run."""
    from reattention_kernels.triton_ops import select
    from reattention_kernels.triton_ops.topk import TopkTuning, merge, score_select_triton

    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("a separate merge or selection kernel ran where the scan should select")

    monkeypatch.setattr(merge, "score_topk_fwd_kernel_merge", Refused())
    monkeypatch.setattr(select, "_select_small", Refused())
    hq, h, d = QWEN[model]
    for grown in (0, 37):
        torch.manual_seed(grown)
        q = make_queries(1, 1, hq, d, torch.float32, device, "randn")
        k = make_keys(1, 500, h, d, torch.float32, device, "dup")
        shift = torch.tensor([grown], dtype=torch.int64, device=device)
        sel, n_sel = score_select_triton(q, k, TOP_K, MAX_BLOCKS, BLOCK, 32, length=420, shift=shift,
                                         fuse_selection=True, tuning=TopkTuning(splits=4))  # fmt: skip
        want_sel, want_n = selection_ref(q, k, TOP_K, MAX_BLOCKS, BLOCK, 32, length=420 + grown)
        assert torch.equal(n_sel, want_n) and torch.equal(sel, want_sel), f"shift {grown}"
        assert counts_are_zero()


@pytest.mark.parametrize("model", list(QWEN))
@pytest.mark.parametrize(("tq", "splits", "fuse_merge"), [(1, 5, False), (1, 5, True), (9, 1, False), (9, 3, False)])
def test_scope_attention(model, tq, splits, fuse_merge, device):
    """A decode step split over the scope (merged by the merge kernel or in the last program) and a
    short prefill chunk, split or not, over sink + selected + local."""
    from reattention_kernels.triton_ops.attention import scope_attention_fwd

    hq, h, d = QWEN[model]
    torch.manual_seed(splits + tq)
    q, k, v, sel, n, kwargs = make_inputs(1, tq, 300, hq, h, d, "fp32", 4, 250, (37,), 40, device)
    o, lse = scope_attention_fwd(q, k, v, sel, n, return_lse=True, splits=splits, fuse_merge=fuse_merge, **kwargs)
    ro, rlse = scope_attention_ref(q, k, v, sel, n, return_lse=True, **kwargs)
    torch.testing.assert_close(o, ro, **TOL["fp32"])
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    assert counts_are_zero()
    got, _ = scope_attention(q, k, v, sel, n, kernel_options=TRITON, **kwargs)
    torch.testing.assert_close(got, ro, **TOL["fp32"])


# real shapes: (model, TQ, keys) of a decode step at 128K and 1M keys, and of a prefill chunk of 512
GPU_SCORING = [("qwen1.5b", 1, 131072), ("qwen1.5b", 1, 1000003), ("qwen0.5b", 1, 1000003),
               ("qwen1.5b", 512, 131072), ("qwen0.5b", 512, 32768)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("model", "tq", "tk"), GPU_SCORING)
@pytest.mark.parametrize("kind", ["randn", "dup"])
def test_scoring_at_real_shapes(model, tq, tk, kind):
    hq, h, d = QWEN[model]
    torch.manual_seed(tk + tq)
    q = make_queries(1, tq, hq, d, torch.bfloat16, "cuda", kind)
    k = make_keys(1, tk, h, d, torch.bfloat16, "cuda", kind)
    assert_same_hits(score_topk(q, k, TOP_K, kernel_options=TRITON), score_topk_ref(q, k, TOP_K))


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(QWEN))
@pytest.mark.parametrize("fuse", [False, True])
def test_a_graphed_decode_step_at_1m_keys(model, fuse):
    """A decode step's selection and scope attention (sink 32, 256 blocks of 32, local 8,192) over a
    1M-token store, recorded in a CUDA graph and replayed while the store grows, with both epilogues
    off and on: the GPU's atomics and ordering at the models' shapes."""
    hq, h, d = QWEN[model]
    sink, local, tokens = 32, 8192, 1_000_003
    options = KernelOptions(backend="triton", fuse_decode_selection=fuse, fuse_decode_merge=fuse)
    torch.manual_seed(0)
    q, k, v, _, _, kwargs = make_inputs(1, 1, tokens, hq, h, d, "bf16", sink, tokens - local, (0,), 0, "cuda")
    del kwargs["local_start"]  # the window moves with the store
    middle = tokens - 4000 - sink - local
    shift = torch.zeros(1, dtype=torch.int64, device="cuda")

    def step():
        sel, n_sel = score_select(q, k[:, sink:], TOP_K, MAX_BLOCKS, BLOCK, sink, length=middle, shift=shift,
                                  kernel_options=options)  # fmt: skip
        o, _ = scope_attention(q, k, v, sel, n_sel, local_start=tokens - 4000 - local, length=tokens - 4000,
                               shift=shift, kernel_options=options, **kwargs)  # fmt: skip
        return sel, n_sel, o

    step()  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sel, n_sel, o = step()
    for grown in (0, 1, 3999):
        shift.fill_(grown)
        graph.replay()
        want_sel, want_n = selection_ref(q, k[:, sink:], TOP_K, MAX_BLOCKS, BLOCK, sink, length=middle + grown)
        assert torch.equal(n_sel, want_n) and torch.equal(sel, want_sel), f"shift {grown}"
        end = tokens - 4000 + grown
        ro, _ = scope_attention_ref(q, k[:, :end], v[:, :end], sel, n_sel, **dict(kwargs, local_start=end - local))
        torch.testing.assert_close(o, ro, **TOL["bf16"])
    assert counts_are_zero()
