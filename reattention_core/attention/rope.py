"""`RopeSpec`: a snapshot of the model's own rotary settings, for re-applying RoPE ourselves.

ReAttention stores keys without RoPE and rotates the assembled scope at fresh positions, so it
needs the model's inverse frequencies and attention scaling (llama3-type scaling and YaRN change
them; plain RoPE has scaling 1). They are read from the model's rotary module once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from reattention_core.errors import UnsupportedModelError

# RoPE types whose frequencies do not depend on the sequence length once positions stay inside
# the pre-training window (dynamic NTK only rescales beyond it, which ReAttention never reaches).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True)
class RopeSpec:
    """Inverse frequencies ``[D // 2]`` (fp32) and the cos/sin multiplier of a rotary module."""

    inv_freq: torch.Tensor
    attention_scaling: float
    rope_type: str

    @classmethod
    def from_rotary(cls, rotary: torch.nn.Module) -> RopeSpec:
        rope_type = str(getattr(rotary, "rope_type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        # `original_inv_freq` is the unscaled table even after a dynamic-RoPE module rescaled itself.
        inv_freq = getattr(rotary, "original_inv_freq", None)
        if inv_freq is None:
            inv_freq = cast(torch.Tensor, rotary.inv_freq)
        return cls(
            inv_freq=inv_freq.detach().float().clone(),
            attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
            rope_type=rope_type,
        )

    def to(self, device: torch.device | str) -> RopeSpec:
        return RopeSpec(self.inv_freq.to(device), self.attention_scaling, self.rope_type)
