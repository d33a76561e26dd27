"""The exact-tie rule of scoring assumes that ``tl.dot`` scores two identical keys identically wherever
they sit in a tile. A GPU's tensor cores do; the CPU interpreter does only through the conftest's
float64 dot (numpy's float32 GEMM rounds some columns differently on some CPUs)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _tile_scores(q, k, s, IEEE: tl.constexpr, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    o_m, o_n, o_d = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    b_q = tl.load(q + o_m[:, None] * D + o_d[None, :])
    b_k = tl.load(k + o_n[:, None] * D + o_d[None, :])
    if IEEE:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    tl.store(s + o_m[:, None] * N + o_n[None, :], b_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n"), [(16, 32), (16, 64), (64, 64)])
def test_identical_keys_score_identically_anywhere_in_a_tile(device, dtype, m, n):
    torch.manual_seed(m + n)
    q = torch.randn(m, 64, device=device).to(dtype)
    k = torch.randn(n, 64, device=device).to(dtype)
    k[:] = k[n // 2]  # every key alike: the first, middle and last columns of each GEMM tile
    s = torch.empty(m, n, device=device, dtype=torch.float32)
    _tile_scores[(1,)](q, k, s, IEEE=dtype == torch.float32, M=m, N=n, D=64)
    assert torch.isfinite(s).all()
    assert (s == s[:, :1]).all(), f"{int((s != s[:, :1]).any(0).sum())} of {n} columns differ"
    # and they are the scores: fp32 products of the same inputs, up to accumulation order
    torch.testing.assert_close(s, q.float() @ k.float().T, rtol=1e-5, atol=1e-4)
