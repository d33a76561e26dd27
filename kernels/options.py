"""`KernelOptions`: which backend the ops run and which optional kernel paths they take.

The options travel with each call (the engine keeps one instance and hands it down to the ops);
nothing here is read from module state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")


@dataclass(frozen=True)
class KernelOptions:
    """Settings of the kernel ops; the defaults are the package's tested behaviour.

    Attributes:
        backend: ``"triton"`` forces the Triton kernels (and fails where they cannot run),
            ``"reference"`` the PyTorch references, ``"auto"`` Triton on CUDA where a kernel covers
            the shape; ``None`` reads ``REATTENTION_KERNELS`` (see `dispatch.resolve_backend`),
            else ``"auto"``.
        triton_selection: ``"auto"`` selects blocks with the fused Triton kernel on CUDA; ``False``
            keeps the torch reference there (for comparing the two; same outputs).
        small_selection: a selection of few hits per row (a decode step) runs in one program that
            counts votes in registers; ``False`` sends every selection through the histogram path
            that prefill chunks take (same outputs).
        fuse_decode_selection: a decode step's scoring kernel merges its key splits and selects
            the blocks in its last program, instead of two more launches (same outputs).
        fuse_decode_merge: a split scope attention merges its partial outputs in its last
            program, instead of a merge kernel (equal to the merge kernel up to the order of
            its sums).
    """

    backend: Backend | None = None
    triton_selection: bool = True
    small_selection: bool = True
    fuse_decode_selection: bool = False
    fuse_decode_merge: bool = False

    def __post_init__(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS} (or None)")
        for f in dataclasses.fields(self):
            if f.name != "backend" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"KernelOptions.{f.name} must be True or False, got {getattr(self, f.name)!r}")

    def replace(self, **changes: Any) -> KernelOptions:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)


DEFAULT_OPTIONS = KernelOptions()


def with_backend(kernel_options: KernelOptions | None, backend: str | None) -> KernelOptions:
    """``kernel_options`` (default `KernelOptions()`) with ``backend`` in it where one is given: the
    ``backend=`` shorthand of the engine and `enable_reattention`. Two different backends raise."""
    options = kernel_options or DEFAULT_OPTIONS
    if backend is None or backend == options.backend:
        return options
    if options.backend is not None:
        raise ValueError(f"backend={backend!r} disagrees with kernel_options.backend={options.backend!r}")
    return options.replace(backend=backend)
