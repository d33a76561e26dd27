"""Backend choice for every op: Triton on CUDA, the PyTorch reference elsewhere.

`resolve_backend` is the one place a backend is decided; a request of ``None`` (no
`KernelOptions.backend`) reads ``REATTENTION_KERNELS`` (``auto``, ``triton`` or ``reference``) here.
Nothing here imports Triton, so the reference path works without it. Under ``TRITON_INTERPRET=1``
the Triton backend also runs on CPU tensors (slowly): that is how the kernels are tested on CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from reattention_kernels.options import BACKENDS

ENV_VAR = "REATTENTION_KERNELS"


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS}")
    return value


def resolve_backend(tensor: torch.Tensor, backend: str | None = None, *, supported: bool = True) -> str:
    """``"triton"`` or ``"reference"`` for an op on ``tensor``.

    ``backend`` (``None``: ``REATTENTION_KERNELS``, else ``"auto"``) ``"triton"`` forces Triton and
    fails loudly where it cannot run; ``"auto"`` picks Triton for CUDA tensors when it is installed
    and the op's kernel covers the shape (``supported``).
    """
    choice = backend or requested_backend()
    if choice not in BACKENDS:
        raise ValueError(f"backend {choice!r} is not one of {BACKENDS}")
    if choice == "reference":
        return "reference"
    runnable = triton_available() and (tensor.is_cuda or interpreting())
    if choice == "triton":
        if not runnable:
            raise RuntimeError(
                "the Triton backend was requested but cannot run here: it needs the `triton` package and a CUDA "
                f"tensor (or TRITON_INTERPRET=1 for CPU tensors); unset {ENV_VAR} to use the reference"
            )
        return "triton"
    return "triton" if runnable and supported and tensor.is_cuda else "reference"
