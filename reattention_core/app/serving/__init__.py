"""OpenAI-compatible serving of a `ReAttentionEngine` (extra ``serve``: fastapi + uvicorn).

    reattention serve                        # embedded model on http://127.0.0.1:8000/v1

    from reattention_core.serving import BackgroundServer
    with BackgroundServer(engine) as srv:    # free loopback port, daemon thread
        openai.OpenAI(base_url=srv.base_url, api_key="x").chat.completions.create(...)

The names below are imported on first use: the `reattention` command registers its ``serve``
subcommand from this package, and every other subcommand must work without the extra installed.
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
