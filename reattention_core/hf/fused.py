"""`fused_projections`: one matrix multiply where a layer runs several on the same input, reversibly.

At decode ``q/k/v_proj`` and ``gate/up_proj`` are tiny GEMMs on one input; concatenating each group's
weights makes one GEMM per group. The product equals the separate ones only up to summation order, so
only compiled layers (`reattention_core.hf.compiled`, their own prefix-cache fingerprint) use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from reattention_core.hf.architectures import decoder_layers

# (parent attribute, the projections fused into one GEMM, in the order the modeling code calls them)
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("mlp", ("gate_proj", "up_proj")),
)
# The other projections, wrapped as groups of one for their one-row products (``row_reductions``).
SINGLES: tuple[tuple[str, tuple[str, ...]], ...] = (("self_attn", ("o_proj",)), ("mlp", ("down_proj",)))
# Largest weight (elements) whose one-row product is a reduction: the embedded model's largest is 1.8M
# (gate/up, 3072 x 576), faster as a reduction; Llama-3.1-8B's smallest, 16.8M (o_proj), was slower
# (docs/design-notes.md). Nothing in between was measured.
ROW_REDUCTION_MAX_ELEMENTS = 1 << 22


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_reductions: bool) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; with ``row_reductions``, a one-row ``x`` and a small enough
    weight, the same product as a multiply and an fp32 sum.

    A GEMM library takes several times longer for one row than reading a small weight does; written
    as ``(x * W).sum(-1)`` in fp32, the product is a row reduction that Inductor compiles into one
    Triton kernel fused with the elementwise ops around it. Eagerly the form would materialise the
    ``[N, K]`` product, so only compiled layers ask for it (which is also why `SINGLES` are wrapped).
    """
    if row_reductions and x.shape[:-1].numel() == 1 and weight.numel() <= ROW_REDUCTION_MAX_ELEMENTS:
        y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    return F.linear(x, weight, bias)


class _Fused(nn.Module):
    """The concatenated weight (and bias) of one group, and the slices of the last fused product."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, sections: list[int], row_reductions: bool
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sections = sections
        self.row_reductions = row_reductions
        # (input, slices) of the last fused product, until the group's last part has taken its slice
        self.pending: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None


class _Part(nn.Module):
    """Stands in for projection ``index`` of a fused group.

    The first part called runs the fused GEMM, returns its own slice and keeps the others with the
    input they came from; a later part called on that same input returns its slice, and any other
    call computes its own product (a model that calls them differently stays correct, only slower).
    """

    def __init__(self, fused: _Fused, index: int, original: nn.Linear) -> None:
        super().__init__()
        self.fused = fused
        self.index = index
        self.original = (original,)  # a tuple: not a child module, so its parameters are not listed twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fused
        if self.index == 0:
            y = _product(x, fused.weight, fused.bias, fused.row_reductions)
            if len(fused.sections) == 1:
                return y
            parts = y.split(fused.sections, dim=-1)
            fused.pending = (x, parts)
            return parts[0]
        pending = fused.pending
        if self.index == len(fused.sections) - 1:
            fused.pending = None
        if pending is not None and pending[0] is x:
            return pending[1][self.index]
        linear = self.original[0]
        return _product(x, linear.weight, linear.bias, fused.row_reductions)


def _fusable(linears: Sequence[nn.Module]) -> bool:
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0].weight
    return all(
        m.weight.device == first.device
        and m.weight.dtype == first.dtype
        and m.weight.device.type != "meta"
        and (m.bias is None) == (linears[0].bias is None)
        and not m._forward_hooks
        and not m._forward_pre_hooks
        and not hasattr(m, "_hf_hook")
        for m in linears
    )


@torch.no_grad()
def _fuse(parent: nn.Module, names: tuple[str, ...], row_reductions: bool) -> list[nn.Linear] | None:
    linears = [m for m in (getattr(parent, n, None) for n in names) if isinstance(m, nn.Linear)]
    if len(linears) != len(names) or not _fusable(linears):
        return None
    weight = torch.cat([m.weight for m in linears])
    biases: list[torch.Tensor] = [m.bias for m in linears if m.bias is not None]  # all or none (`_fusable`)
    bias = torch.cat(biases) if biases else None
    fused = _Fused(weight, bias, [m.out_features for m in linears], row_reductions)
    start = 0
    for i, (name, m) in enumerate(zip(names, linears, strict=True)):
        end = start + m.out_features
        m.weight.data = fused.weight.data[start:end]
        if m.bias is not None and fused.bias is not None:
            m.bias.data = fused.bias.data[start:end]
        start = end
        setattr(parent, name, _Part(fused, i, m))
    return linears


@torch.no_grad()
def _unfuse(parent: nn.Module, names: tuple[str, ...], linears: list[nn.Linear]) -> None:
    for name, m in zip(names, linears, strict=True):
        setattr(parent, name, m)
        m.weight.data = m.weight.data.clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()


@contextmanager
def fused_projections(model: nn.Module, enabled: bool = True, row_reductions: bool = False) -> Iterator[int]:
    """Fuse each decoder layer's q/k/v and gate/up projections inside the block;
    with ``row_reductions``, also wrap ``o_proj`` and ``down_proj``, and take one-row products as reductions.

    The original weights become views of the fused weight and the modules `_Part` stand-ins; on exit
    all is put back, each weight in storage of its own. Only plain ``nn.Linear`` groups on one device
    and dtype, with a bias on all or none and without hooks, are fused.

    Yields:
        int: how many groups were fused or wrapped (0 when nothing qualified, or not ``enabled``).
    """
    if not enabled:
        yield 0
        return
    done: list[tuple[nn.Module, tuple[str, ...], list[nn.Linear]]] = []
    try:
        for layer in decoder_layers(model):
            for parent_name, names in GROUPS + (SINGLES if row_reductions else ()):
                parent = getattr(layer, parent_name, None)
                if parent is None or any(isinstance(getattr(parent, n, None), _Part) for n in names):
                    continue  # absent, or already fused by an enclosing block
                linears = _fuse(parent, names, row_reductions)
                if linears is not None:
                    done.append((parent, names, linears))
        yield len(done)
    finally:
        for parent, names, linears in reversed(done):
            _unfuse(parent, names, linears)
