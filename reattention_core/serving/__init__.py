"""The public import path of the server, `reattention_core.app.serving` (``BackgroundServer``, ``serve``, ...)."""

from __future__ import annotations

from typing import Any

from reattention_core.app import serving as _serving


def __getattr__(name: str) -> Any:
    return getattr(_serving, name)


__all__ = list(_serving.__all__)
