"""Fingerprints: what must match before cached keys and values may be reused.

Model, config, dtype, device type, kernel backend and tokenizer all go into an `EngineFingerprint`;
its ``root`` roots the page hash chain, so a page made under other settings is never found, and its
components in the disk manifest explain a miss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from reattention_core.config import ReAttentionConfig
from reattention_kernels.options import KernelOptions

# Version of the on-disk page format and of the hash chain. Bump it whenever either changes: pages
# of another version then live under another fingerprint and age out through LRU eviction.
FORMAT_VERSION = 2  # 2: fixed page layout, one CRC-32 over the data section

# Values sampled per tensor by `model_fingerprint`.
MODEL_SAMPLES = 256

# Model config entries that change what the model computes (architecture sizes are also covered
# by the parameter shapes, RoPE by the sampled inv_freq buffer).
_MODEL_CONFIG_KEYS = (
    "model_type",
    "hidden_act",
    "rms_norm_eps",
    "layer_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "use_sliding_window",
    "pretraining_tp",
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, samples: int = MODEL_SAMPLES) -> str:
    """sha256 of the model's tensor names, shapes, dtypes and sampled values.

    Weights are not hashed byte by byte (too slow at every start-up): for each parameter and buffer
    in name order, its name, shape, dtype and ``samples`` values at flat positions ``i * numel // S``,
    plus the model class and the config entries that change the computation. Other shapes, a
    fine-tune that moves a tensor, another RoPE base (``inv_freq`` is sampled) all change it; a few
    edited weights between the sampled positions would not, so clear the cache after such an edit.
    """
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(_json({k: getattr(cfg, k, None) for k in _MODEL_CONFIG_KEYS}))
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    picked: list[torch.Tensor] = []
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        n = t.numel()
        if n == 0 or t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        k = min(samples, n)
        idx = torch.arange(k, dtype=torch.int64) * n // k
        picked.append(flat[idx.to(flat.device)].contiguous().view(torch.uint8))
    if picked:
        # One transfer for all samples (a GPU model pays a single sync).
        h.update(torch.cat([p.reshape(-1) for p in picked]).cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer class, vocabulary, special token ids and chat template."""
    parts: dict[str, Any] = {"class": type(tokenizer).__name__}
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        try:
            parts["vocab"] = _sha(_json(sorted(get_vocab().items())))
        except Exception:  # noqa: BLE001 - a tokenizer without a usable vocab still gets a fingerprint
            parts["vocab"] = None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        parts[name] = getattr(tokenizer, name, None)
    parts["chat_template"] = getattr(tokenizer, "chat_template", None)
    return _sha(_json(parts))


def config_fingerprint(config: ReAttentionConfig) -> str:
    """`ReAttentionConfig.fingerprint` of the settings that change keys and values.

    ``max_context`` is only an input limit, so it is left out: engines that differ only in it
    share their cache.
    """
    return config.replace(max_context=None).fingerprint()


def resolved_backend(device: torch.device, backend: str | None) -> str:
    """The kernel backend ops on ``device`` actually run (``"triton"`` or ``"reference"``)."""
    from reattention_kernels.dispatch import resolve_backend

    try:
        return resolve_backend(torch.empty(0, device=device), backend)
    except (RuntimeError, ValueError) as exc:  # the run itself will raise with the full message
        return f"unresolved:{backend}:{exc.__class__.__name__}"


def kernels_fingerprint(kernel_options: KernelOptions, backend: str) -> str | None:
    """The component of kernel settings (`KernelOptions`) that change keys and
    values on ``backend`` (resolved), or ``None``. Only the decode merge epilogue: it equals the merge
    kernel only up to the order of its sums. The selection paths give identical outputs (tested bit
    for bit), so they share pages with the default settings."""
    if backend == "triton" and kernel_options.fuse_decode_merge:
        return "decode-merge-epilogue"
    return None


@dataclass(frozen=True)
class EngineFingerprint:
    """Every input that decides the keys and values of a prompt, and their combined ``root``.

    Attributes:
        components: name -> value (strings), in the order ``format``, ``model``, ``tokenizer``,
            ``config``, ``dtype``, ``device``, ``backend``, ``page_size``.
        model_name: a display name, stored in the manifest (not part of the root).
        details: readable values behind some components (the config as a dict), stored in the
            manifest to explain misses (not part of the root).
    """

    components: dict[str, str]
    model_name: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", _sha(_json(self.components)))

    @property
    def namespace(self) -> str:
        """Directory name of this fingerprint's pages in the disk cache."""
        return self.root[:32]

    def with_component(self, name: str, value: str) -> EngineFingerprint:
        """This fingerprint with one more component (a new root)."""
        return EngineFingerprint({**self.components, name: value}, self.model_name, self.details)

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Names of the components whose values differ from ``other`` (a manifest's components)."""
        keys = list(self.components) + [k for k in other if k not in self.components]
        return [k for k in keys if str(self.components.get(k)) != str(other.get(k))]


def engine_fingerprint(
    *,
    model_hash: str,
    tokenizer_hash: str,
    config: ReAttentionConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    page_size: int,
    model_name: str = "",
    selection: str | None = None,
    compiled: str | None = None,
) -> EngineFingerprint:
    components = {
        "format": str(FORMAT_VERSION),
        "model": model_hash,
        "tokenizer": tokenizer_hash,
        "config": config_fingerprint(config),
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "backend": backend,
        "page_size": str(page_size),
    }
    if selection is not None:  # an approximate selection (budgeted offload) computes other keys and values
        components["selection"] = selection
    if compiled is not None:  # compiled layers round differently from eager ones
        components["compiled"] = compiled
    details = {"config": config.replace(max_context=None).to_dict()}
    return EngineFingerprint(components=components, model_name=model_name, details=details)
