"""`scope_attention_triton` against `scope_attention_ref`."""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import KernelOptions, scope_attention
from reattention_kernels.reference import scope_attention_ref

TRITON = KernelOptions(backend="triton")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4},
    "fp16": {"atol": 2e-3, "rtol": 2e-3},
    "bf16": {"atol": 1.6e-2, "rtol": 1.6e-2},
}


def make_inputs(b, tq, t, hq, h, d, dtype, sink, local_start, n_sel, ns, device, offset=3):
    """Inputs with K/V as strided views (from ``offset``) of bigger stores, ascending selections."""
    dt = DTYPES[dtype]
    q = torch.randn(b, tq, hq, d, device=device, dtype=dt)
    k = torch.randn(b, offset + t, h, d, device=device, dtype=dt)[:, offset:]
    v = torch.randn(b, t + offset, h, d, device=device, dtype=dt)[:, :t]
    sel = torch.zeros(b, ns, dtype=torch.int64, device=device)
    for i, n in enumerate(n_sel):
        sel[i, :n] = torch.randperm(local_start - sink, device=device)[:n].sort().values + sink
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    kwargs = {"sink_len": sink, "local_start": local_start, "inv_freq": inv_freq, "attention_scaling": 1.1}
    kwargs["scale"] = d**-0.5
    return q, k, v, sel, torch.tensor(n_sel, device=device), kwargs


def check(b, tq, t, hq, h, d, dtype, sink, local_start, n_sel, ns, return_lse, device):
    torch.manual_seed(0)
    q, k, v, sel, n, kwargs = make_inputs(b, tq, t, hq, h, d, dtype, sink, local_start, n_sel, ns, device)
    o, lse = scope_attention(q, k, v, sel, n, return_lse=return_lse, kernel_options=TRITON, **kwargs)
    ro, rlse = scope_attention_ref(q, k, v, sel, n, return_lse=return_lse, **kwargs)
    assert o.dtype == q.dtype and o.shape == q.shape
    torch.testing.assert_close(o, ro, **TOL[dtype])
    if return_lse:
        assert lse is not None and lse.dtype == torch.float32 and lse.shape == (b, tq, hq)
        torch.testing.assert_close(lse, rlse, atol=1e-3 if dtype == "fp32" else 2e-2, rtol=1e-4)
    else:
        assert lse is None


# (B, TQ, T, HQ, H, D, dtype, sink_len, local_start, n_sel per row, NS, return_lse)
CASES = [
    (1, 1, 100, 4, 1, 64, "fp32", 4, 80, (10,), 12, True),
    (2, 1, 300, 9, 3, 64, "fp16", 4, 260, (37, 5), 40, False),
    (2, 1, 130, 32, 8, 128, "fp16", 2, 100, (0, 30), 30, True),
    (1, 1, 37, 4, 4, 128, "fp32", 0, 30, (7,), 7, False),
    (2, 5, 100, 6, 2, 64, "fp32", 4, 60, (10, 0), 12, True),
    (1, 17, 70, 8, 2, 128, "fp16", 2, 40, (7,), 9, True),
    (2, 3, 50, 3, 3, 128, "fp16", 0, 0, (0, 0), 0, True),
    (1, 9, 9, 12, 3, 64, "fp32", 0, 0, (0,), 0, False),
    (1, 24, 64, 4, 1, 64, "fp32", 8, 32, (), 0, True),
    (1, 1, 3, 8, 2, 64, "fp16", 1, 2, (1,), 1, True),
    (3, 2, 90, 3, 1, 64, "fp16", 3, 40, (0, 36, 12), 36, False),
]


@pytest.mark.parametrize(
    ("b", "tq", "t", "hq", "h", "d", "dtype", "sink", "local_start", "n_sel", "ns", "return_lse"),
    [
        pytest.param(*c, id="B{}-TQ{}-TK{}-HQ{}-H{}-D{}-{}-sink{}-local{}-nsel{}-ns{}-lse{}".format(
            *c[:9], "_".join(map(str, c[9])) or "0", *c[10:]))
        for c in CASES
    ],
)  # fmt: skip
def test_scope_attention(b, tq, t, hq, h, d, dtype, sink, local_start, n_sel, ns, return_lse, device):
    if not n_sel:
        n_sel = (0,) * b
    check(b, tq, t, hq, h, d, dtype, sink, local_start, n_sel, ns, return_lse, device)


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("tq", [1, 7])
def test_scope_attention_splits(tq, splits, device):
    """Flash-decoding (split scope + LSE merge) and the single pass agree with the reference."""
    from reattention_kernels.triton_ops.attention import scope_attention_fwd

    torch.manual_seed(splits)
    q, k, v, sel, n, kwargs = make_inputs(2, tq, 120, 8, 2, 64, "fp32", 4, 90, (20, 3), 20, "cpu")
    q, k, v, sel, n = (x.to(device) for x in (q, k, v, sel, n))
    kwargs["inv_freq"] = kwargs["inv_freq"].to(device)
    o, lse = scope_attention_fwd(q, k, v, sel, n, return_lse=True, splits=splits, **kwargs)
    ro, rlse = scope_attention_ref(q, k, v, sel, n, return_lse=True, **kwargs)
    torch.testing.assert_close(o, ro, **TOL["fp32"])
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_scope_attention_unmasked_tiles(dtype, splits, device):
    """A chunk whose row blocks start at different positions: each runs its fully visible tiles
    without masks, then the causal rest, and a split may begin or end on either side of that border."""
    from reattention_kernels.triton_ops.attention import scope_attention_fwd

    torch.manual_seed(7)
    q, k, v, sel, n, kwargs = make_inputs(2, 70, 220, 4, 2, 64, dtype, 5, 140, (41, 17), 41, "cpu")
    q, k, v, sel, n = (x.to(device) for x in (q, k, v, sel, n))
    kwargs["inv_freq"] = kwargs["inv_freq"].to(device)
    # 64-row programs over 140 rows of two heads: blocks of 32 queries starting at 0, 32 and 64, so the
    # causal part of a block spans two 16-key tiles
    config = (64, 16, 4, 1) if device == "cpu" else (64, 16, 4, 2)
    o, lse = scope_attention_fwd(q, k, v, sel, n, return_lse=True, splits=splits, config=config, **kwargs)
    ro, rlse = scope_attention_ref(q, k, v, sel, n, return_lse=True, **kwargs)
    torch.testing.assert_close(o, ro, **TOL[dtype])
    torch.testing.assert_close(lse, rlse, atol=1e-4 if dtype == "fp32" else 2e-3, rtol=1e-4)


def test_scope_attention_rejects_short_window(device):
    q, k, v, sel, n, kwargs = make_inputs(1, 4, 20, 4, 1, 64, "fp32", 2, 18, (0,), 0, device)
    with pytest.raises(ValueError):
        scope_attention(q, k, v, sel, n, kernel_options=TRITON, **kwargs)


GPU_CASES = [
    (1, 1, 131072, 9, 3, 64, "bf16", 4, 130816, (1024,), 1024, True),
    (2, 1, 131072, 32, 8, 128, "bf16", 4, 131072 - 512, (1024, 7680), 7680, True),
    (1, 256, 131072, 32, 8, 128, "bf16", 4, 131072 - 1024, (4096,), 4096, False),
    (2, 128, 65536, 9, 3, 64, "bf16", 0, 65536 - 256, (2048, 0), 2048, True),
    (1, 512, 2048, 32, 8, 128, "fp16", 0, 0, (0,), 0, True),
    # 148 rows: one full and one partial program of the 128-row shape
    (1, 37, 8192, 32, 8, 128, "bf16", 4, 8192 - 512, (300,), 300, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("b", "tq", "t", "hq", "h", "d", "dtype", "sink", "local_start", "n_sel", "ns", "return_lse"),
    [pytest.param(*c, id="B{}-TQ{}-TK{}-HQ{}-H{}-D{}-{}".format(*c[:7])) for c in GPU_CASES],
)
def test_scope_attention_gpu(b, tq, t, hq, h, d, dtype, sink, local_start, n_sel, ns, return_lse):
    check(b, tq, t, hq, h, d, dtype, sink, local_start, n_sel, ns, return_lse, "cuda")


@pytest.mark.gpu
def test_scope_attention_gpu_no_sync():
    q, k, v, sel, n, kwargs = make_inputs(1, 1, 65536, 32, 8, 128, "bf16", 4, 65000, (2048,), 2048, "cuda")
    scope_attention(q, k, v, sel, n, kernel_options=TRITON, **kwargs)  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scope_attention(q, k, v, sel, n, kernel_options=TRITON, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cached_rope_tables_equal_fresh_ones_and_follow_their_inputs(device):
    from reattention_kernels.triton_ops import rope as ops

    ops._TABLES.clear()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, device=device).float() / 64))
    long_cos, long_sin = ops.cached_rope_table(inv_freq, 300, 1.0, torch.float32, device)
    short_cos, short_sin = ops.cached_rope_table(inv_freq, 37, 1.0, torch.float32, device)  # a slice of the first
    fresh_cos, fresh_sin = ops.rope_table(inv_freq, 37, 1.0, torch.float32, device)
    assert torch.equal(short_cos, fresh_cos) and torch.equal(short_sin, fresh_sin)
    assert short_cos.data_ptr() == long_cos.data_ptr() and len(ops._TABLES) == 1
    scaled, _ = ops.cached_rope_table(inv_freq, 37, 0.5, torch.float32, device)  # other settings: another table
    assert torch.allclose(scaled, fresh_cos * 0.5) and len(ops._TABLES) == 2
    inv_freq.mul_(2)  # changed in place: the old table must not be served
    moved, _ = ops.cached_rope_table(inv_freq, 37, 1.0, torch.float32, device)
    assert torch.equal(moved, ops.rope_table(inv_freq, 37, 1.0, torch.float32, device)[0])
    big, _ = ops.cached_rope_table(inv_freq, ops._TABLE_MAX_POSITIONS + 1, 1.0, torch.float32, device)
    assert big.shape[0] == ops._TABLE_MAX_POSITIONS + 1 and len(ops._TABLES) == 3  # computed, not kept


def test_cached_rope_tables_accept_inference_tensors(device):
    # The engine builds its RopeSpec under torch.inference_mode: such tensors have no version counter.
    from reattention_kernels.triton_ops import rope as ops

    ops._TABLES.clear()
    with torch.inference_mode():
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, device=device).float() / 64))
        cos, sin = ops.cached_rope_table(inv_freq, 40, 1.0, torch.float32, device)
        again, _ = ops.cached_rope_table(inv_freq, 20, 1.0, torch.float32, device)
    fresh_cos, fresh_sin = ops.rope_table(inv_freq, 40, 1.0, torch.float32, device)
    assert torch.equal(cos, fresh_cos) and torch.equal(sin, fresh_sin)
    assert again.data_ptr() == cos.data_ptr() and len(ops._TABLES) == 1


def test_block_shape_for_head_dim_128_prefill_needs_the_shared_memory(monkeypatch):
    """The 128-row, 128-key shape is picked only for 16-bit head dim 128 prefill on a device with ~200 KB of
    shared memory per program; anything else keeps the shapes that fit smaller devices."""
    ops = pytest.importorskip("reattention_kernels.triton_ops.attention")
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    cuda = torch.device("cuda", 0)
    big = {0: True}
    monkeypatch.setattr(ops, "_large_smem", lambda index: big[index])
    assert ops._config(2048, torch.bfloat16, 128, cuda) == (128, 128, 8, 3)
    assert ops._config(128, torch.float16, 128, cuda) == (128, 128, 8, 3)
    for rows, dtype, d in ((127, torch.bfloat16, 128), (2048, torch.float32, 128), (2048, torch.bfloat16, 256),
                           (2048, torch.bfloat16, 64)):  # fmt: skip
        bm, bn, _, _ = ops._config(rows, dtype, d, cuda)
        assert (bm, bn) != (128, 128), (rows, dtype, d)
    big[0] = False  # an A100's 163 KB
    assert ops._config(2048, torch.bfloat16, 128, cuda)[:2] == (64, 64)
