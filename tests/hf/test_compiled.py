"""Compiled decoder layers (`ReAttentionEngine(compile_model=True)`, `reattention_core.hf.compiled`)."""

from __future__ import annotations

import pytest
import torch

from reattention_core import ReAttentionConfig, ReAttentionEngine
from reattention_core.errors import InvalidInputError
from reattention_core.hf.architectures import decoder_layers, final_norm
from reattention_core.hf.compiled import compiled_layers
from tests.helpers import ByteTokenizer, tiny_model

CFG = ReAttentionConfig(sink_size=4, block_size=8, top_k=2, max_blocks=4, local_window=32, prefill_chunk_size=16)
PROMPT = "The pass key is 51234. Remember it. " + "The grass is green. The sky is blue. " * 5 + "What is the pass key?"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: q/k norms before RoPE, head_dim 16
def test_compiled_layers_give_the_eager_tokens_and_leave_the_model_as_it_was(arch: str) -> None:
    model = tiny_model(arch)
    eager = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False)
    compiled = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False, compile_model=True)
    assert len(eager.encode(PROMPT)) > CFG.scope_size + 2 * CFG.prefill_chunk_size  # selection has work to do
    want = eager.generate(PROMPT, max_new_tokens=10).token_ids
    assert compiled.generate(PROMPT, max_new_tokens=10).token_ids == want
    assert compiled.generate(PROMPT, max_new_tokens=10).token_ids == want  # the second call reuses the graphs
    modules = [*decoder_layers(model), final_norm(model)]
    assert not any("forward" in vars(m) for m in modules)  # nothing left behind
    assert eager.generate(PROMPT, max_new_tokens=10).token_ids == want


def test_compiled_layers_work_with_an_offloaded_store() -> None:
    from reattention_core import OffloadConfig

    model = tiny_model("llama")
    want = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False).generate(PROMPT, max_new_tokens=8).token_ids
    for offload in (OffloadConfig(keys="device"), OffloadConfig(block=8)):
        engine = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False, offload=offload, compile_model=True)
        assert engine.generate(PROMPT, max_new_tokens=8).token_ids == want


def test_the_command_line_passes_compile_through() -> None:
    from reattention_core.app.cli import build_parser

    assert build_parser().parse_args(["generate", "hi", "--compile"]).compile is True
    assert build_parser().parse_args(["ask", "docs/", "-q", "x"]).compile is False


def test_compiled_logits_match_eager_to_rounding_and_the_block_nests() -> None:
    model = tiny_model("mistral")
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    layers = decoder_layers(model)
    with torch.no_grad():
        want = model(ids).logits
        with compiled_layers(model):
            assert all("forward" in vars(layer) for layer in layers)
            with compiled_layers(model):  # an inner block leaves the outer block's wrappers alone
                pass
            assert all("forward" in vars(layer) for layer in layers)
            got = model(ids).logits
        with compiled_layers(model, enabled=False):
            assert not any("forward" in vars(layer) for layer in layers)
    assert not any("forward" in vars(layer) for layer in layers)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_compiling_engine_caches_under_its_own_fingerprint(tmp_path) -> None:
    model = tiny_model("llama")
    eager = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=True)
    compiled = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=True, compile_model=True)
    a, b = eager._prefix.fingerprint(eager._settings()), compiled._prefix.fingerprint(compiled._settings())
    assert "compiled" not in a.components  # eager engines keep the fingerprints (and pages) they had
    assert b.components["compiled"] == "inductor+fused-projections+row-reductions" and a.root != b.root
    assert b.differences(a.components) == ["compiled"]


def test_compile_model_must_be_a_bool() -> None:
    with pytest.raises(InvalidInputError, match="compile_model"):
        ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), CFG, cache=False, compile_model="yes")


@pytest.mark.gpu
def test_compiled_engine_finds_the_pass_key_like_the_eager_one_on_gpu() -> None:
    """The embedded model, bf16, CUDA graphs: the compiled layers are recorded into the step graphs."""
    eager = ReAttentionEngine.from_pretrained(cache=False)
    compiled = ReAttentionEngine(eager.model, eager.tokenizer, eager.config, cache=False, compile_model=True)
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    text = filler * 60 + "The pass key is 48213. Remember it. 48213 is the pass key. " + filler * 60
    chat = [
        {"role": "user", "content": "There is a pass key hidden in this text.\n\n" + text + "\n\nWhat is the pass key?"}
    ]
    prompt = eager.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "The pass key is"
    want = eager.generate(prompt, max_new_tokens=8)
    got = compiled.generate(prompt, max_new_tokens=8)
    assert "48213" in want.text and "48213" in got.text
