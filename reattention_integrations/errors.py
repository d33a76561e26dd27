"""Typed errors of the framework adapters (all are `reattention_core.ReAttentionError` subclasses)."""

from __future__ import annotations

from reattention_core.errors import InvalidInputError


class UnsupportedMessageError(InvalidInputError):
    """A framework message the engine cannot represent: a tool call or result, an image, audio, ...

    The engine renders plain system / user / assistant text with the model's chat template; the
    message says which message (by index) is the problem and what to send instead.
    """
