"""Test helpers: tiny model factories and a byte-level tokenizer (nothing is downloaded)."""

from __future__ import annotations

import random

import torch

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
)


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kwargs = dict(_COMMON)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    return cls(**kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.config._attn_implementation_internal = "sdpa"
    return model.eval()


class ByteTokenizer:
    """Maps each UTF-8 byte to a token id (offset 3; 0 = pad, 1 = bos, 2 = eos)."""

    eos_token_id = 2
    bos_token_id = 1
    pad_token_id = 0
    chat_template = "bytes"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - 3 for i in ids if 3 <= i < 259)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def random_ids(n: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


def word_text(n: int, seed: int) -> str:
    """``n`` characters of seeded prose-like words (distinct seeds give distinct prompts)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "north", "paper"]
    out = ""
    while len(out) < n:
        out += rng.choice(words) + rng.choice([" ", " ", ", ", ". "])
    return out[:n]
