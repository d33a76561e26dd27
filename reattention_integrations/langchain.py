"""LangChain adapters: `ChatReAttention` (a chat model) and `ReAttentionLLM` (a text LLM).

Both are thin adapters over one shared `ReAttentionEngine` (`reattention_integrations._engine`):
construction is cheap, the model loads on first use. A chain example is in the README.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel, BaseLLM
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        ChatResult,
        Generation,
        GenerationChunk,
        LLMResult,
    )
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        'reattention_integrations.langchain needs langchain-core: pip install "reattention[langchain]"'
    ) from exc
from pydantic import ConfigDict, Field, SecretStr

from reattention_core.generation.request import GenerationResult
from reattention_core.prompts import Prompt
from reattention_integrations._fields import AdapterFields
from reattention_integrations._generation import (
    EventSource,
    Sampling,
    call_in_thread,
    generation_events,
    iterate_in_thread,
)
from reattention_integrations.errors import UnsupportedMessageError

PROVIDER = "reattention"
# LangChain may pass these through to `_generate`/`_stream`; they are decided before we run.
_LANGCHAIN_KWARGS = ("stream",)
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts for the model's chat template.

    System, human and AI messages (and ``ChatMessage`` with role system/user/assistant) map to
    the three roles the engine renders; a message's ``name`` is dropped. Anything else (tool
    calls and results, images, audio, ...) raises `UnsupportedMessageError` naming the message.
    """
    out = []
    for i, message in enumerate(messages):
        role = _ROLES.get(message.type)
        if message.type == "chat":
            role = {
                "user": "user",
                "human": "user",
                "assistant": "assistant",
                "ai": "assistant",
                "system": "system",
            }.get(str(getattr(message, "role", "")).lower())
        if role is None:
            raise UnsupportedMessageError(
                f"message {i} is a {type(message).__name__} (type {message.type!r}); this model reads system, human "
                "and AI text only (no tool calling). Put tool results into a HumanMessage as text instead."
            )
        if role == "assistant" and getattr(message, "tool_calls", None):
            raise UnsupportedMessageError(
                f"message {i} is an AIMessage with tool calls; ChatReAttention has no tool calling. "
                "Send the assistant's text only."
            )
        out.append({"role": role, "content": _text(message.content, i)})
    return out


def _text(content: str | list[Any], index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise UnsupportedMessageError(
                f"message {index} has a {kind!r} content block; this model reads text only. "
                "Send the text (for a document, its extracted text) instead."
            )
    return "".join(parts)


def _usage(result: GenerationResult) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=result.cached_tokens),
    )


def _info(result: GenerationResult, model_name: str) -> dict[str, Any]:
    return {"model_name": model_name, "finish_reason": result.finish_reason}


class _LangChainFields(AdapterFields):
    """Fields LangChain users and its standard tests pass to every model."""

    streaming: bool = Field(default=False, description="Stream internally even for invoke (per-token callbacks).")
    # Accepted so that code written for hosted models runs unchanged; a local model has no
    # network calls to time out, retry or authenticate.
    timeout: float | None = Field(default=None, description="Accepted for compatibility; unused (local model).")
    max_retries: int | None = Field(default=None, description="Accepted for compatibility; unused (local model).")
    api_key: SecretStr | None = Field(default=None, description="Accepted for compatibility; unused (local model).")

    def _prepare(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[Sampling, dict[str, Any]]:
        """(sampling, ``context``/``progress`` keyword arguments) for one call."""
        options = self._call_options(kwargs, ignore=_LANGCHAIN_KWARGS)
        run = {"context": options.get("context"), "progress": options.get("progress", self.progress)}
        return self._sampling(stop, options), run

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: dict[str, Any]) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type=model_type,  # type: ignore[typeddict-item]
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params


class ChatReAttention(_LangChainFields, BaseChatModel):
    """LangChain chat model over a local ReAttention engine (default: the embedded SmolLM2-135M).

    For cache reuse, put the documents in the system message (or first in the first human message)
    and the question last: the prefix cache reuses the longest token prefix shared with an earlier
    prompt. ``context=corpus`` per call does this layout for you.

    Supports invoke / stream / batch and their async forms (generation runs in a worker thread,
    so the event loop is never blocked), per-token callbacks, string stop sequences,
    ``usage_metadata`` (with ``input_token_details.cache_read`` = prompt tokens restored from the
    prefix cache) and ``response_metadata`` (``model_name``, ``finish_reason``). Concurrent calls
    are safe: the shared engine runs them one at a time.

    Call options (``invoke(..., **options)``): ``max_tokens``, ``temperature``, ``top_p``,
    ``top_k``, ``seed``, ``context`` (a corpus placed first in the first human message, after any
    system message) and ``progress``.

    Not supported (typed `UnsupportedMessageError`): tool calling, tool messages, non-text content.
    """

    # On the concrete class: pydantic lets the framework base's extra="ignore" win over a mixin's.
    # Typos in settings are errors, not silently ignored fields.
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "reattention-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "config": self.config,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat = to_chat_messages(messages)
        sampling, run = self._prepare(stop, kwargs)
        return self._chat_result(self.get_engine().generate(chat, sampling=sampling.params(), **run))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chat = to_chat_messages(messages)
        sampling, run = self._prepare(stop, kwargs)
        result = await call_in_thread(lambda: self.get_engine().generate(chat, sampling=sampling.params(), **run))
        return self._chat_result(result)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        events = self._events(messages, stop, kwargs)()
        try:
            for item in events:
                chunk = self._chunk(item)
                if run_manager is not None and not isinstance(item, GenerationResult):
                    run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
        finally:
            events.close()  # same thread that drove it (the engine lock requires it)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for item in iterate_in_thread(self._events(messages, stop, kwargs)):
            chunk = self._chunk(item)
            if run_manager is not None and not isinstance(item, GenerationResult):
                await run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk

    def _events(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> EventSource:
        """Validate now; return a factory that loads the engine and starts generating (in its thread)."""
        chat = to_chat_messages(messages)
        sampling, run = self._prepare(stop, kwargs)

        return lambda: generation_events(self.get_engine(), chat, sampling=sampling, **run)

    def _chunk(self, item: str | GenerationResult) -> ChatGenerationChunk:
        if isinstance(item, GenerationResult):
            # Usage and model name go on the last chunk only, so aggregation counts them once.
            message = AIMessageChunk(
                content="",
                usage_metadata=_usage(item),
                response_metadata=_info(item, self.model_name),
                chunk_position="last",
            )
            return ChatGenerationChunk(message=message, generation_info={"finish_reason": item.finish_reason})
        return ChatGenerationChunk(message=AIMessageChunk(content=item))

    def _chat_result(self, result: GenerationResult) -> ChatResult:
        message = AIMessage(
            content=result.text, usage_metadata=_usage(result), response_metadata=_info(result, self.model_name)
        )
        generation = ChatGeneration(message=message, generation_info={"finish_reason": result.finish_reason})
        return ChatResult(generations=[generation], llm_output={"model_name": self.model_name})


class ReAttentionLLM(_LangChainFields, BaseLLM):
    """LangChain text LLM (string in, string out) over a local ReAttention engine.

    With ``chat_template=True`` (the default; instruction-tuned models expect it) each prompt is
    sent as one user message through the model's chat template; ``False`` sends the raw text for
    plain continuation. Same options, streaming, async and cache behaviour as `ChatReAttention`;
    ``generation_info`` carries ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and
    ``cached_tokens``.
    """

    chat_template: bool = Field(default=True, description="Wrap each prompt as a user message in the chat template.")

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "reattention"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "config": self.config,
            "chat_template": self.chat_template,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

    def _prompt(self, text: str) -> Prompt:
        if self.chat_template and getattr(self.get_engine().tokenizer, "chat_template", None):
            return [{"role": "user", "content": text}]
        return text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        sampling, run = self._prepare(stop, kwargs)
        results = [self.get_engine().generate(self._prompt(p), sampling=sampling.params(), **run) for p in prompts]
        return self._llm_result(results)

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        sampling, run = self._prepare(stop, kwargs)

        def generate(text: str) -> GenerationResult:
            return self.get_engine().generate(self._prompt(text), sampling=sampling.params(), **run)

        results = [await call_in_thread(functools.partial(generate, p)) for p in prompts]
        return self._llm_result(results)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        events = self._events(prompt, stop, kwargs)()
        try:
            for item in events:
                chunk = _text_chunk(item)
                if run_manager is not None and not isinstance(item, GenerationResult):
                    run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk
        finally:
            events.close()

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for item in iterate_in_thread(self._events(prompt, stop, kwargs)):
            chunk = _text_chunk(item)
            if run_manager is not None and not isinstance(item, GenerationResult):
                await run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk

    def _events(self, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> EventSource:
        sampling, run = self._prepare(stop, kwargs)
        return lambda: generation_events(self.get_engine(), self._prompt(prompt), sampling=sampling, **run)

    def _llm_result(self, results: list[GenerationResult]) -> LLMResult:
        generations = [[Generation(text=r.text, generation_info=_generation_info(r))] for r in results]
        usage = {
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
            "cached_tokens": sum(r.cached_tokens for r in results),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return LLMResult(generations=generations, llm_output={"token_usage": usage, "model_name": self.model_name})


def _generation_info(result: GenerationResult) -> dict[str, Any]:
    return {
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
    }


def _text_chunk(item: str | GenerationResult) -> GenerationChunk:
    if isinstance(item, GenerationResult):
        return GenerationChunk(text="", generation_info=_generation_info(item))
    return GenerationChunk(text=item)


__all__ = ["ChatReAttention", "ReAttentionLLM", "UnsupportedMessageError", "to_chat_messages"]
