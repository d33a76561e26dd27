"""`append_kv`: the Triton store write against its reference (shifted lengths, strides, dtypes)."""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import KernelOptions, append_kv
from reattention_kernels.reference import append_kv_ref


@pytest.mark.parametrize(
    ("b", "t", "h", "d"), [(1, 1, 3, 64), (2, 5, 1, 128), (1, 16, 4, 64), (2, 3, 2, 16)]
)  # fmt: skip
@pytest.mark.parametrize("shift", [None, 0, 7])
@pytest.mark.parametrize(("src", "dst"), [(torch.float32, torch.float32), (torch.float32, torch.float16)])
def test_the_write_equals_the_reference(device, b, t, h, d, shift, src, dst) -> None:
    g = torch.Generator().manual_seed(b * 100 + t)
    cap, start = 40, 11
    keys = torch.randn(b, cap, h, d, generator=g).to(device, dst)
    values = torch.randn(b, cap, h, d, generator=g).to(device, dst)
    # the model hands over [B, H, T, D] states transposed to [B, T, H, D]: not contiguous
    k = torch.randn(b, h, t, d, generator=g).to(device, src).transpose(1, 2)
    v = torch.randn(b, h, t, d, generator=g).to(device, src).transpose(1, 2)
    s = None if shift is None else torch.tensor([shift], dtype=torch.int64, device=device)
    before = keys.clone()
    want_k, want_v = keys.clone(), values.clone()
    append_kv_ref(want_k, want_v, k, v, start, s)
    append_kv(keys, values, k, v, start, shift=s, kernel_options=KernelOptions(backend="triton"))
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
    row = start + (shift or 0)
    assert torch.equal(keys[:, row : row + t], k.to(dst)) and torch.equal(values[:, row : row + t], v.to(dst))
    assert torch.equal(keys[:, :row], before[:, :row]) and torch.equal(keys[:, row + t :], before[:, row + t :])


def test_a_shift_must_be_one_int64() -> None:
    keys = torch.zeros(1, 8, 1, 16)
    k = torch.ones(1, 1, 1, 16)
    reference = KernelOptions(backend="reference")
    with pytest.raises(ValueError, match="int64"):
        append_kv(keys, keys.clone(), k, k, 0, shift=torch.tensor([1.0]), kernel_options=reference)
