"""Kernel tests: Triton ops against their PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter. Triton reads ``TRITON_INTERPRET`` when a
kernel is decorated, so it is set here, before any test imports ``reattention_kernels.triton_ops``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")


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
