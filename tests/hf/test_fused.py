"""Fused q/k/v and gate/up projections (`reattention_core.hf.fused`), used by compiled layers."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from reattention_core.hf import fused as fused_module
from reattention_core.hf.architectures import decoder_layers
from reattention_core.hf.compiled import compiled_layers
from reattention_core.hf.fused import GROUPS, SINGLES, fused_projections
from tests.helpers import random_ids, tiny_model

_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _CountGemms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in _GEMMS
        return func(*args, **(kwargs or {}))


def _gemms(model: nn.Module, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    with torch.no_grad(), _CountGemms() as counter:
        logits = model(ids).logits
    return counter.count, logits


def _projections(model: nn.Module, groups=GROUPS) -> list[nn.Module]:
    return [getattr(getattr(layer, p), n) for layer in decoder_layers(model) for p, names in groups for n in names]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])  # qwen2: q/k/v biases
def test_fused_groups_run_one_gemm_each_give_the_same_logits_and_are_undone(arch: str) -> None:
    model = tiny_model(arch)
    ids = random_ids(24)
    layers = len(decoder_layers(model))
    before = _projections(model)
    values = [m.weight.detach().clone() for m in before]
    names = [n for n, _ in model.named_parameters()]
    plain, want = _gemms(model, ids)
    with fused_projections(model) as groups:
        assert groups == 2 * layers
        fused, got = _gemms(model, ids)
        shared = {m.weight.untyped_storage().data_ptr() for m in before}
        assert len(shared) == groups  # the originals' weights are views of one tensor per group
    assert plain - fused == 3 * layers  # seven GEMMs per layer become four
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = _projections(model)
    assert all(a is b and type(a) is nn.Linear for a, b in zip(after, before, strict=True))
    assert len({m.weight.untyped_storage().data_ptr() for m in after}) == len(after)  # own storage again
    assert all(torch.equal(m.weight, v) for m, v in zip(after, values, strict=True))
    assert [n for n, _ in model.named_parameters()] == names
    assert _gemms(model, ids)[0] == plain


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_row_products_become_reductions_up_to_the_size_limit(arch: str, monkeypatch) -> None:
    model = tiny_model(arch)
    layers = len(decoder_layers(model))
    one, many = random_ids(1), random_ids(12)
    everything = GROUPS + SINGLES
    before = _projections(model, everything)
    plain_one, want_one = _gemms(model, one)
    plain_many, want_many = _gemms(model, many)
    assert plain_one == plain_many == 7 * layers + 1  # the projections and the LM head
    with fused_projections(model, row_reductions=True) as groups:
        assert groups == 4 * layers  # two fused groups and two wrapped projections per layer
        n_one, got_one = _gemms(model, one)
        n_many, got_many = _gemms(model, many)
        monkeypatch.setattr(fused_module, "ROW_REDUCTION_MAX_ELEMENTS", 0)  # every weight is over it
        n_over, got_over = _gemms(model, one)
    assert n_one == 1  # only the LM head, outside the decoder layers, is still a GEMM
    assert n_many == 4 * layers + 1 and n_over == 4 * layers + 1
    for got, want in ((got_one, want_one), (got_many, want_many), (got_over, want_one)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = _projections(model, everything)
    assert all(a is b and type(a) is nn.Linear for a, b in zip(after, before, strict=True))
    assert len({m.weight.untyped_storage().data_ptr() for m in after}) == len(after)


def test_a_part_called_on_another_input_computes_its_own_product() -> None:
    model = tiny_model("llama")
    attn = decoder_layers(model)[0].self_attn
    x, y = torch.randn(1, 3, attn.q_proj.in_features), torch.randn(1, 3, attn.q_proj.in_features)
    with torch.no_grad():
        want_k, want_v = attn.k_proj(y), attn.v_proj(x)
        with fused_projections(model):
            attn.q_proj(x)  # keeps the k and v slices of x
            torch.testing.assert_close(attn.k_proj(y), want_k)  # y is not x: computed, not the slice
            torch.testing.assert_close(attn.v_proj(x), want_v)  # the slice of x's product
            assert attn.q_proj.fused.pending is None  # the group's last part released the slices


def test_groups_that_cannot_be_fused_are_left_alone() -> None:
    model = tiny_model("llama")
    first, second = decoder_layers(model)[:2]
    handle = first.self_attn.k_proj.register_forward_hook(lambda *a: None)  # someone else's hook
    second.mlp.up_proj.to(torch.float64)  # a dtype the rest of its group does not have
    try:
        with fused_projections(model) as groups:
            assert groups == 2 * len(decoder_layers(model)) - 2
            assert type(first.self_attn.q_proj) is nn.Linear and type(second.mlp.gate_proj) is nn.Linear
            assert type(first.mlp.gate_proj) is not nn.Linear  # the rest is fused
        with fused_projections(model, enabled=False) as groups:
            assert groups == 0
    finally:
        handle.remove()


def test_compiled_layers_run_the_fused_gemms() -> None:
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("llama")
    ids, token = random_ids(16), random_ids(1)
    with torch.no_grad():
        want, want_token = model(ids).logits, model(token).logits
        with compiled_layers(model):
            got, codes = run_and_get_code(model, ids)
            got_token, token_codes = run_and_get_code(model, token)

    def calls(codes: list[str]) -> int:
        return sum(len(re.findall(r"extern_kernels\.(?:mm|addmm|bmm)\(", code)) for code in codes)

    assert calls(codes) == 4  # one graph serves every layer: q/k/v, o, gate/up, down
    assert calls(token_codes) == 0 and token_codes  # one row: the four products are reductions
    torch.testing.assert_close(got.logits, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_token.logits, want_token, rtol=1e-4, atol=1e-4)
    assert all(type(m) is nn.Linear for m in _projections(model, GROUPS + SINGLES))
