"""Prompts as token ids: plain text, chat messages through the tokenizer's template, and ``context=``.

``context=`` puts a corpus at the start of the first user message (after any system message), so
that every question over it renders the same leading tokens and the prefix cache reuses them; the
renderer also tells where the corpus's tokens end, the boundary prefill breaks its chunks at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reattention_core import tokenization
from reattention_core.errors import CacheError, InvalidInputError

Prompt = str | Sequence[Mapping[str, Any]]
CHAT_ROLES = ("system", "user", "assistant")
# Between the context and the question when `context=` is given.
CONTEXT_SEPARATOR = "\n\n"
_QUESTION_SENTINEL = "\ue000\ue001question\ue001\ue000"


class PromptRenderer:
    """Renders and tokenises prompts for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer (or one with the same methods).
        model_name: named in error messages.
    """

    def __init__(self, tokenizer: Any, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name

    def encode(self, prompt: Prompt, *, context: str | None = None) -> list[int]:
        """Token ids of a plain-text prompt, or of a chat (message list) with its template applied.

        A message list is rendered with the tokenizer's chat template and the assistant turn
        opened. Keep long shared material (a corpus) in the first messages and the question last,
        so the rendered prompt of every question starts with the same tokens and the prefix cache
        reuses them.

        Args:
            context: long, stable material (a corpus) to put first. It is placed at the start of
                the first user message (``context + "\\n\\n" + question``), after any system
                message, and the prompt is then always rendered with the chat template (a string
                prompt becomes one user message); without a chat template it is plain text
                ``context + "\\n\\n" + prompt``. Keep system messages identical across
                questions: they come before the context.
        """
        if context is not None:
            return self.encode_with_context(prompt, context)[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidInputError("the prompt is empty; pass some text or a list of chat messages")
            return tokenization.encode(self.tokenizer, prompt, add_special_tokens=True)[0]
        return self.encode_messages(prompt, add_generation_prompt=True)

    def prefix_ids(self, prompt: Prompt | None = None, *, context: str | None = None) -> list[int]:
        """Token ids of what later prompts start with: ``context=``'s corpus as a question's prompt renders
        it (`context_prefix_ids`), or a prompt (text, or messages without the assistant turn opened)."""
        if (prompt is None) == (context is None):
            raise InvalidInputError("pass the prompt to cache, or context=..., not both")
        if context is not None:
            return self.context_prefix_ids(context)
        if isinstance(prompt, str):
            return self.encode(prompt)
        assert prompt is not None
        return self.encode_messages(prompt, add_generation_prompt=False)

    def encode_messages(self, prompt: Prompt, *, add_generation_prompt: bool) -> list[int]:
        if isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes, bytearray)):
            messages = _check_messages(prompt)
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidInputError(
                    f"the tokenizer of {self.model_name} has no chat template; pass a plain string prompt instead"
                )
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            return tokenization.encode(self.tokenizer, text, add_special_tokens=False)[0]
        raise InvalidInputError(
            f"prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
        )

    def encode_with_context(self, prompt: Prompt, context: str) -> tuple[list[int], int | None]:
        """Token ids of a ``context=`` prompt and where its corpus ends (its first question token).

        The boundary counts the prompt's tokens that lie wholly before the question's text (the
        tokens around it can differ from those of the corpus tokenised alone: BPE splits a run of
        whitespace by what follows it). ``None`` when it cannot be told; the prompt is then
        cached by whole pages only.
        """
        if not isinstance(context, str):
            raise InvalidInputError(f"context must be a string, got {type(context).__name__}")
        if not getattr(self.tokenizer, "chat_template", None):
            if not isinstance(prompt, str):
                raise InvalidInputError(
                    f"the tokenizer of {self.model_name} has no chat template; pass the question as a string"
                )
            head = context + CONTEXT_SEPARATOR
            return self._tokenize_split(head + prompt, len(head), add_special_tokens=True)
        messages = _with_context(prompt, context)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        marked = self.tokenizer.apply_chat_template(
            _with_context(prompt, context, marker=_QUESTION_SENTINEL), tokenize=False, add_generation_prompt=True
        )
        cut = marked.find(_QUESTION_SENTINEL)
        if cut < 0 or marked[:cut] + marked[cut + len(_QUESTION_SENTINEL) :] != text:  # pragma: no cover
            return self.encode(messages), None  # a template that rewrites the content
        return self._tokenize_split(text, cut, add_special_tokens=False)

    def _tokenize_split(self, text: str, cut: int, *, add_special_tokens: bool) -> tuple[list[int], int | None]:
        """Token ids of ``text`` and how many of them end at or before character ``cut``."""
        return tokenization.encode(self.tokenizer, text, add_special_tokens=add_special_tokens, cut=cut)

    def context_prefix_ids(self, context: str) -> list[int]:
        """Token ids of everything a ``context=`` prompt renders before its question.

        They are the tokens a real question's prompt has there (the corpus is tokenised with a
        placeholder question after it), so `ReAttentionEngine.prefill(context=...)` warms exactly those.
        """
        if not isinstance(context, str) or not context.strip():
            raise InvalidInputError("context must be a non-empty string")
        if not getattr(self.tokenizer, "chat_template", None):
            head = context + CONTEXT_SEPARATOR
            text, cut, special = head + _QUESTION_SENTINEL, len(head), True
        else:
            messages = _with_context(_QUESTION_SENTINEL, context)
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            cut, special = text.find(_QUESTION_SENTINEL), False
            if cut < 0:  # pragma: no cover - a template that rewrites the content
                raise CacheError(
                    "the chat template does not keep the message text verbatim; prefill the full prompt instead"
                )
        ids, boundary = self._tokenize_split(text, cut, add_special_tokens=special)
        if boundary is None:
            return list(self.tokenizer(text[:cut], add_special_tokens=special)["input_ids"])
        return ids[:boundary]


def _with_context(prompt: Prompt, context: str, *, marker: str = "") -> list[dict[str, str]]:
    """Messages with ``context`` at the start of the first user message (system messages stay first).

    ``marker`` goes between the corpus and the question (to find the boundary in the rendering).
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt)
    for i, m in enumerate(messages):
        if m["role"] == "user":
            messages[i] = {"role": "user", "content": context + CONTEXT_SEPARATOR + marker + m["content"]}
            return messages
    raise InvalidInputError("context= needs a user message to attach to; add {'role': 'user', 'content': question}")


def _check_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    if not messages:
        raise InvalidInputError("the message list is empty; pass at least one {'role': 'user', 'content': ...}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InvalidInputError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise InvalidInputError(f"message {i} has role {role!r}; allowed roles: {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise InvalidInputError(f"message {i} content must be a string, got {type(content).__name__}")
        clean.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in clean):
        raise InvalidInputError("every message is empty; the prompt needs some text")
    return clean
