"""`compiled_layers`: run a Hugging Face model's decoder layers through `torch.compile`, reversibly.

At decode the small kernels around attention (norms, projections, rotary, residuals, MLP) set the pace;
compiling each whole decoder layer fuses them. What the block guarantees is `compiled_layers`'s doc.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from reattention_core.hf import _compat, attention_fn, cache
from reattention_core.hf.architectures import decoder_layers, final_norm
from reattention_core.hf.fused import fused_projections

COMPILER = "inductor"
# The prefix-cache fingerprint component of compiled layers: pages made by another compiled
# computation (before the projections were fused: "inductor"; before one-row products became
# reductions: "inductor+fused-projections") are not reused.
FINGERPRINT = "inductor+fused-projections+row-reductions"


@contextmanager
def compiled_layers(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run ``model``'s decoder layers (and final norm) compiled inside the block; no-op if not ``enabled``.

    The ReAttention parts stay out of the graphs: the cache update and the attention function get
    ``torch.compiler.disable`` on first use (not at import, which would import Dynamo and triton into
    every process), so they run as they do eagerly. One graph serves all layers per step shape (a
    prefill chunk, a decode step, one dynamic shape for shorter chunks); q/k/v and gate/up run fused
    (`reattention_core.hf.fused`). Each layer's ``forward`` is an instance attribute for the block and
    is deleted on exit, so the model is exactly what it was. Results equal the eager model's to float
    rounding, not bit for bit, so compiled engines keep prefix-cache pages under their own `FINGERPRINT`.
    """
    if not enabled:
        yield
        return
    cache.keep_out_of_graphs()
    modules = [*decoder_layers(model), final_norm(model)]
    with ExitStack() as stack:
        # the compiled layers call the attention function as it is (a graph break); the plain one is back after
        previous = _compat.registered_attention(attention_fn.ATTN_IMPLEMENTATION)
        _compat.register_attention(attention_fn.ATTN_IMPLEMENTATION, attention_fn.compiled_forward())
        if previous is not None:
            stack.callback(_compat.register_attention, attention_fn.ATTN_IMPLEMENTATION, previous)
        stack.enter_context(_compat.dynamo_layer_settings())
        stack.enter_context(fused_projections(model, row_reductions=True))
        for module in modules:
            if "forward" in vars(module):  # already compiled by an enclosing block (or patched by someone else)
                continue
            module.forward = torch.compile(module.forward, backend=COMPILER)
            stack.callback(vars(module).pop, "forward", None)
        yield
