"""Kernel tests: Triton ops against their PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter. Triton reads ``TRITON_INTERPRET`` when a
kernel is decorated, so it is set here, before any test imports ``reattention_kernels.triton_ops``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")


def _position_independent_dots() -> None:
    """Make the interpreter's ``tl.dot`` score every output element alike, as a GPU's tensor cores do.

    The interpreter computes a dot with ``np.matmul``, and numpy's OpenBLAS rounds some output
    columns of a float32 GEMM differently from others on some CPUs (seen on an AMD EPYC, Haswell
    kernels: in a 16 x 32 product the first and last 8 columns against the middle 16). Two identical
    keys then score 1 ulp apart, and the exact-tie tests (lower index first) fail for a reason no
    GPU has. Float32 and float16 operands are multiplied in float64 here (every product exact, the
    sum rounded once), then rounded to the float32 accumulator: identical keys score identically
    wherever they sit in a tile. Other operand types keep the interpreter's own dot.
    """
    from triton.runtime import interpreter

    plain = interpreter.InterpreterBuilder.create_dot
    floats = (np.dtype(np.float16), np.dtype(np.float32))

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.data.dtype in floats and b.data.dtype in floats and d.data.dtype == np.float32:
            prod = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)).astype(np.float32)
            return interpreter.TensorHandle(prod + d.data, d.dtype.scalar)
        return plain(self, a, b, d, *args, **kwargs)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _position_independent_dots()


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["default", "histogram"])
def selection_path(request, monkeypatch) -> str:
    """Both paths of the Triton selection: by default pairwise votes in one program up to
    ``SMALL_HITS`` hits and the histogram above; then the histogram for every size."""
    if request.param == "histogram":
        from reattention_kernels.triton_ops import select

        monkeypatch.setattr(select, "SMALL_HITS", 0)
    return request.param
