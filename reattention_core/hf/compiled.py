"""`compiled_layers`: run a Hugging Face model's decoder layers through `torch.compile`, reversibly.

A decode step is dozens of small kernels per layer besides attention: RMSNorms, projections, the
rotary multiply (a no-op under ReAttention that still runs), residual adds, the MLP's activation;
at decode they, not the attention, set the pace. Compiling each whole decoder layer fuses them.

The ReAttention parts stay out of the graphs: the cache update (`ReAttentionLayer.update`) and the
attention function get ``torch.compiler.disable`` on first use (not at import: that would import
``torch._dynamo``, and with it triton, into every process), so Dynamo breaks the graph around them
and they run as they do eagerly (their Triton kernels and CUDA-graph shifts untouched).
One compiled graph serves all layers (their ``layer_idx`` is left unspecialised), for each step
shape: a prefill chunk, a decode step, and one dynamic shape for a prompt's shorter chunks.
Inside the block each layer's q/k/v and gate/up projections also run as one GEMM per group
(`reattention_core.hf.fused`): seven GEMMs per layer become four; with one row (a decode step) and
small weights, each is a fused reduction kernel instead of a GEMM.

Inside the context manager every decoder layer's ``forward`` (and the final norm's) is an instance
attribute wrapping `torch.compile`; on exit the attributes are deleted, so the model is exactly what
it was. Compilation happens on first use of each shape (tens of seconds; later engines and calls in
the same process reuse it). Results equal the eager model's to float rounding, not bit for bit:
fused reductions round differently, so an engine that compiles keeps its prefix-cache pages under a
fingerprint of its own (`FINGERPRINT`).
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
    """Run ``model``'s decoder layers (and final norm) compiled inside the block; no-op if not ``enabled``."""
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
