"""The environment a result was measured in: device, versions, commit, model, dtype, kernels.

Every result row carries it, so a JSON line is interpretable on its own.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def git_commit(root: Path | None = None) -> str:
    """Short commit of the working tree (``$REATTENTION_COMMIT`` for exported copies without .git),
    with ``+dirty`` when tracked files differ from it."""
    if os.environ.get("REATTENTION_COMMIT"):
        return os.environ["REATTENTION_COMMIT"]
    cwd = root or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def environment(engine: Any) -> dict[str, Any]:
    """Device, versions, commit and model of a run (the attention config goes in each row apart)."""
    import transformers

    param = next(engine.model.parameters())
    try:  # what "auto" resolves to for this model's tensors (attention may still fall back per shape)
        from reattention_kernels.dispatch import resolve_backend

        backend = resolve_backend(param, engine.backend)
    except (ImportError, ValueError, RuntimeError):
        backend = engine.backend or "unknown"
    return {
        "device": device_name(param.device),
        "dtype": str(param.dtype).removeprefix("torch."),
        "model": engine.model_name,
        "window": engine.window,
        "kernels": backend,
        "store": _store(engine),
        "compiled_layers": bool(getattr(engine, "compile_model", False)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git_commit(),
        "platform": sys.platform,
    }


def _store(engine: Any) -> str:
    """Where the KV store lived: ``resident`` or the offload settings."""
    off = getattr(engine, "offload", None)
    if off is None:
        return "resident"
    if off.keys == "device":
        return "offload(keys=device)"
    return f"offload(keys=host,block={off.block},budget={off.budget},refine={off.refine})"
