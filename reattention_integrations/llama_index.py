"""LlamaIndex adapter: `ReAttentionLLM`, a `CustomLLM` over a local ReAttention engine.

Why its context window is large is `ReAttentionLLM`'s doc; a query-engine example is in the README.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Sequence
from typing import Any

try:
    from llama_index.core.base.llms.types import (
        CachePoint,
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
        TextBlock,
    )
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        'reattention_integrations.llama_index needs llama-index-core: pip install "reattention[llama-index]"'
    ) from exc
from pydantic import ConfigDict

from reattention_core.generation.request import GenerationResult
from reattention_core.prompts import Prompt
from reattention_integrations._fields import AdapterFields
from reattention_integrations._generation import (
    Events,
    EventSource,
    Sampling,
    call_in_thread,
    generation_events,
    iterate_in_thread,
)
from reattention_integrations.errors import UnsupportedMessageError

# What `metadata.context_window` reports when the config sets no `max_context`. ReAttention has no
# context limit other than memory (keys and values grow by a fixed size per token); this is the
# longest context the package has been measured at (1M tokens), large enough
# that LlamaIndex never splits a corpus that fits in memory. Set `config={"max_context": N}` to
# advertise (and enforce) a smaller one.
MEMORY_BOUND_CONTEXT_WINDOW = 1 << 20

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
}


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages as ``{"role", "content"}`` dicts for the model's chat template.

    Text blocks are joined; `CachePoint` markers are dropped (the prefix cache needs no marker:
    it reuses whatever token prefix repeats). Tool/function messages and image, audio, video or
    document blocks raise `UnsupportedMessageError` naming the message.
    """
    out = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise UnsupportedMessageError(
                f"message {i} has role {message.role.value!r}; this model reads system, user and assistant text "
                "only (no tool calling). Put tool results into a user message as text instead."
            )
        parts = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                parts.append(block.text)
            elif not isinstance(block, CachePoint):
                raise UnsupportedMessageError(
                    f"message {i} has a {type(block).__name__}; this model reads text only. "
                    "Send the text (for a document, its extracted text) instead."
                )
        out.append({"role": role, "content": "\n".join(parts)})
    return out


def _raw(result: GenerationResult, model_name: str) -> dict[str, Any]:
    """OpenAI-shaped usage, which LlamaIndex's token counting reads from ``response.raw``."""
    return {
        "model": model_name,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
        },
    }


class ReAttentionLLM(AdapterFields, CustomLLM):
    """LlamaIndex LLM over a local ReAttention engine (default: the embedded SmolLM2-135M).

    ``context_window`` is never the pre-training window: LlamaIndex's response synthesizers split
    whatever exceeds it into window-sized calls, each prefilled anew; ReAttention has no such bound, so
    the whole corpus goes into one prompt whose stable prefix the cache reuses.

    A chat model (``metadata.is_chat_model``): query engines send chat messages, rendered with
    the model's chat template. ``metadata.context_window`` is ``config.max_context`` when set,
    else `MEMORY_BOUND_CONTEXT_WINDOW` (no limit but memory), never the pre-training window.
    ``complete(prompt)`` sends the prompt as one user message (after ``system_prompt``, if set);
    ``complete(prompt, formatted=True)`` sends it as raw text. Every response's ``raw`` holds
    ``usage`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
    ``prompt_tokens_details.cached_tokens``), ``finish_reason`` and ``model``. The async forms run
    generation in a worker thread, so the event loop is never blocked.

    Call options (``chat(messages, **options)``): ``max_tokens``, ``temperature``, ``top_p``,
    ``top_k``, ``seed``, ``stop``, ``context``, ``progress``.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    @classmethod
    def class_name(cls) -> str:
        return "ReAttentionLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._context_window(),
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.model_name,
        )

    def _context_window(self) -> int:
        if self.engine is not None:
            limit = self.engine.config.max_context
        else:
            assert self._settings is not None
            limit = self._settings.max_context
        return limit if limit is not None else MEMORY_BOUND_CONTEXT_WINDOW

    # -- completion ------------------------------------------------------------------------------

    def _completion_prompt(self, prompt: str, formatted: bool) -> Prompt:
        if formatted or not getattr(self.get_engine().tokenizer, "chat_template", None):
            return prompt
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self._generate(lambda: self._completion_prompt(prompt, formatted), kwargs)
        return CompletionResponse(text=result.text, raw=_raw(result, self.model_name))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        events = self._events(lambda: self._completion_prompt(prompt, formatted), kwargs)
        return _responses(events(), self.model_name, chat=False)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = await self._agenerate(lambda: self._completion_prompt(prompt, formatted), kwargs)
        return CompletionResponse(text=result.text, raw=_raw(result, self.model_name))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        events = self._events(lambda: self._completion_prompt(prompt, formatted), kwargs)
        return _aresponses(iterate_in_thread(events), self.model_name, chat=False)

    # -- chat --------------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        chat = to_chat_messages(messages)
        result = self._generate(lambda: chat, kwargs)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=_raw(result, self.model_name)
        )

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        chat = to_chat_messages(messages)
        return _responses(self._events(lambda: chat, kwargs)(), self.model_name, chat=True)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        chat = to_chat_messages(messages)
        result = await self._agenerate(lambda: chat, kwargs)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=_raw(result, self.model_name)
        )

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        chat = to_chat_messages(messages)
        return _aresponses(iterate_in_thread(self._events(lambda: chat, kwargs)), self.model_name, chat=True)

    # -- plumbing ----------------------------------------------------------------------------------

    def _options(self, kwargs: dict[str, Any]) -> tuple[Sampling, dict[str, Any]]:
        options = self._call_options(kwargs)
        run = {"context": options.get("context"), "progress": options.get("progress", self.progress)}
        return self._sampling(None, options), run

    def _generate(self, prompt: Any, kwargs: dict[str, Any]) -> GenerationResult:
        """``prompt`` is a callable: rendering a completion prompt may need the engine (tokenizer)."""
        sampling, run = self._options(kwargs)
        return self.get_engine().generate(prompt(), sampling=sampling.params(), **run)

    async def _agenerate(self, prompt: Any, kwargs: dict[str, Any]) -> GenerationResult:
        sampling, run = self._options(kwargs)
        return await call_in_thread(lambda: self.get_engine().generate(prompt(), sampling=sampling.params(), **run))

    def _events(self, prompt: Any, kwargs: dict[str, Any]) -> EventSource:
        """Validate the options now; the returned factory loads the engine and starts generating."""
        sampling, run = self._options(kwargs)
        return lambda: generation_events(self.get_engine(), prompt(), sampling=sampling, **run)


def _responses(events: Events, model_name: str, *, chat: bool) -> Generator[Any, None, None]:
    """Streamed responses (cumulative text + delta; usage on the last), closing ``events`` in this thread."""
    respond = _responder(model_name, chat=chat)
    try:
        for item in events:
            yield respond(item)
    finally:
        events.close()  # even when the consumer stops early: the engine lock needs the same thread


async def _aresponses(
    events: AsyncIterator[str | GenerationResult], model_name: str, *, chat: bool
) -> AsyncGenerator[Any, None]:
    respond = _responder(model_name, chat=chat)
    async for item in events:
        yield respond(item)


def _responder(model_name: str, *, chat: bool) -> Any:
    """A function turning each text piece, then the final result, into a LlamaIndex response."""
    text = ""

    def respond(item: str | GenerationResult) -> ChatResponse | CompletionResponse:
        nonlocal text
        if isinstance(item, GenerationResult):
            delta, raw = "", _raw(item, model_name)
        else:
            text += item
            delta, raw = item, None
        if chat:
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=raw)
        return CompletionResponse(text=text, delta=delta, raw=raw)

    return respond


__all__ = ["MEMORY_BOUND_CONTEXT_WINDOW", "ReAttentionLLM", "UnsupportedMessageError", "to_chat_messages"]
