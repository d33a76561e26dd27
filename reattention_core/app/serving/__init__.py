"""OpenAI-compatible serving of a `ReAttentionEngine` (extra ``serve``: fastapi + uvicorn).

``reattention serve``, or ``BackgroundServer(engine)`` in a ``with`` block (a free loopback port, a
daemon thread). The names below are imported on first use, so every other subcommand works without
the extra installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AppConfig": "reattention_core.app.serving.app",
    "create_app": "reattention_core.app.serving.app",
    "BackgroundServer": "reattention_core.app.serving.server",
    "ServeConfig": "reattention_core.app.serving.server",
    "serve": "reattention_core.app.serving.server",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["AppConfig", "BackgroundServer", "ServeConfig", "create_app", "serve"]
