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


def _patch_language_once_per_launch() -> None:
    """Patch each ``triton.language`` module for the interpreter once per kernel launch, not at every
    helper call.

    The interpreter patches the language modules a kernel's globals name when it launches (and
    restores them after), and again at every call of a ``@triton.jit`` helper inside it, each time
    listing five modules with ``inspect.getmembers``. The kernels here call helpers in unrolled
    loops, so that re-patching took 40-70% of an engine test's time. A helper whose modules the
    launch has already patched now runs under that patch; any other is patched as before.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched: list[set[int] | None] = [None]  # ids of the modules patched by the running launch

    def langs(fn) -> set[int]:  # the modules `_patch_lang` patches for ``fn``
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    def once(fn):
        done = patched[0]
        if done is None:  # outside a launch
            return patch_lang(fn)
        mine = langs(fn)
        if mine <= done:
            return interpreter._LangPatchScope()  # nothing of its own to restore
        done |= mine
        return patch_lang(fn)

    def call(self, *args, **kwargs):
        outer = patched[0]
        patched[0] = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched[0] = outer

    interpreter._patch_lang = once
    interpreter.GridExecutor.__call__ = call


if os.environ.get("TRITON_INTERPRET") == "1":
    _position_independent_dots()
    _patch_language_once_per_launch()


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["default", "histogram"])
def selection_path(request):
    """The Triton backend's options for both paths of its selection: by default pairwise votes in one
    program up to ``SMALL_HITS`` hits and the histogram above; then the histogram for every size."""
    from reattention_kernels import KernelOptions

    return KernelOptions(backend="triton", small_selection=request.param == "default")
