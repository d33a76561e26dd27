"""The scoring, selection and scope attention kernels compile for sm_90 on a machine without a GPU.

The kernel tests on CPU run Triton's interpreter, which skips the compiler; this runs
`tests/kernels/compile_sm90.py` in a fresh process (without ``TRITON_INTERPRET``) so that a kernel which
only the compiler rejects fails here, not first on the GPU machine. It checks the installed Triton
version only: a construct that one version accepts and another rejects is caught only on that one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_sm90.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_the_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    # every variant the script lists: 16 of the scoring kernel (2 ranking sub-tiles, 4 with TMA, 2 decode, 4
    # decode selecting in the epilogue; 5 of them at the Qwen models' shapes), 3 of its rescoring phase by
    # rows, 2 + 6 by tiles, 4 of the tile top-keys kernel, 3 of blocks, 2 of the one-program selection, 6 of
    # decode scope attention (4 merging) and 4 of prefill scope attention
    assert run.stdout.count("compiled") == 46, run.stdout


def test_nested_jit_helpers_take_no_default_constexprs():
    """A jit helper called from a kernel gets every constexpr argument from its caller: Triton 3.6 (the GPU
    machine's) passes a nested call's default string on unwrapped and fails to compile the kernel ("'str' object
    has no attribute 'type'"), which the interpreter and newer Tritons accept. Kernels launched from the host
    may keep defaults; ``None`` defaults (optional tensors) are fine in both."""
    import ast

    root = Path(__file__).resolve().parents[2] / "kernels" / "triton_ops"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or "kernel" in node.name:
                continue
            if not any("jit" in ast.unparse(d) for d in node.decorator_list):
                continue
            bad = [ast.unparse(d) for d in node.args.defaults if not (isinstance(d, ast.Constant) and d.value is None)]
            if bad:
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {node.name} defaults {bad}")
    assert not offenders, offenders
