"""With a scope that covers every token, ReAttention must reproduce the vanilla model exactly.

Covers Llama, Mistral, Qwen2 and Qwen3 (tiny random-init, fp32): one-shot prefill, chunked
prefill, several decode steps, the selection path itself (blocks wide enough to cover the whole
middle), and that `enable_reattention` leaves the model as it found it.
"""

from __future__ import annotations

import pytest
import torch

from reattention_core import ReAttentionCache, ReAttentionConfig, ReAttentionEngine, ResidentStore, enable_reattention
from reattention_core.hf.architectures import attention_modules, rotary_module
from tests.helpers import random_ids, tiny_model

ATOL = 2e-5


def run_chunked(model, ids: torch.Tensor, cfg: ReAttentionConfig, chunk: int) -> torch.Tensor:
    """Logits of every position, prefilled ``chunk`` tokens at a time under ReAttention."""
    with torch.no_grad(), enable_reattention(model, cfg):
        cache = ReAttentionCache(ResidentStore(model.config.num_hidden_layers))
        outs = [
            model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True).logits
            for s in range(0, ids.shape[1], chunk)
        ]
    return torch.cat(outs, dim=1)


def vanilla(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# Scope covers everything because the whole input fits in sink + local window.
WIDE_LOCAL = ReAttentionConfig(
    sink_size=4, block_size=8, top_k=2, max_blocks=2, local_window=256, prefill_chunk_size=64
)
# Scope covers everything through selection: any hit's block spans the whole middle.
WIDE_BLOCKS = ReAttentionConfig(
    sink_size=4, block_size=512, top_k=1, max_blocks=1, local_window=16, prefill_chunk_size=16
)


@pytest.mark.parametrize(
    "cfg,chunk",
    [(WIDE_LOCAL, 200), (WIDE_LOCAL, 64), (WIDE_LOCAL, 7), (WIDE_BLOCKS, 16), (WIDE_BLOCKS, 5)],
    ids=["one-shot", "chunked-64", "chunked-7", "selection-16", "selection-5"],
)
def test_prefill_logits_match_vanilla(tiny, cfg, chunk):
    ids = random_ids(150)
    ref = vanilla(tiny, ids)
    out = run_chunked(tiny, ids, cfg, chunk)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_full_mode_matches_vanilla_beyond_the_window(tiny):
    ids = random_ids(150)
    cfg = ReAttentionConfig(
        mode="full", sink_size=4, block_size=4, top_k=1, max_blocks=1, local_window=16, prefill_chunk_size=16
    )
    torch.testing.assert_close(run_chunked(tiny, ids, cfg, 16), vanilla(tiny, ids), atol=ATOL, rtol=0)


def test_restricted_scope_changes_logits(tiny):
    """Guard against a silently bypassed attention function: a small scope must change logits."""
    ids = random_ids(150)
    cfg = ReAttentionConfig(sink_size=2, block_size=2, top_k=1, max_blocks=1, local_window=8, prefill_chunk_size=8)
    out = run_chunked(tiny, ids, cfg, 8)
    assert (out - vanilla(tiny, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [WIDE_LOCAL, WIDE_BLOCKS], ids=["local", "selection"])
def test_decode_steps_match_vanilla(tiny, byte_tokenizer, cfg):
    """Greedy engine tokens and per-step logits equal Hugging Face's own greedy decoding."""
    prompt = "tiny models are random but deterministic: "
    engine = ReAttentionEngine(tiny, byte_tokenizer, cfg)
    ids = torch.tensor([engine.encode(prompt)])
    with torch.no_grad():
        hf = tiny.generate(
            ids,
            max_new_tokens=8,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    hf_tokens = hf.sequences[0, ids.shape[1] :].tolist()
    res = engine.generate(prompt, max_new_tokens=8)
    assert list(res.token_ids) == [t for t in hf_tokens if t != 2][: len(res.token_ids)]
    # step-by-step logits under ReAttention against vanilla on the same growing sequence
    seq = torch.cat([ids, torch.tensor([hf_tokens])], dim=1)
    torch.testing.assert_close(
        run_chunked(tiny, seq, cfg, cfg.prefill_chunk_size), vanilla(tiny, seq), atol=ATOL, rtol=0
    )


def test_enable_reattention_is_reversible(tiny):
    ids = random_ids(40)
    before = vanilla(tiny, ids)
    impl = tiny.config._attn_implementation
    rotary = rotary_module(tiny)
    n_hooks = len(rotary._forward_hooks)
    with enable_reattention(tiny, WIDE_LOCAL):
        assert tiny.config._attn_implementation == "reattention"
        assert len(rotary._forward_hooks) == n_hooks + 1
        assert all(hasattr(m, "reattention_runtime") for m in attention_modules(tiny))
    assert tiny.config._attn_implementation == impl
    assert len(rotary._forward_hooks) == n_hooks
    assert not any(hasattr(m, "reattention_runtime") for m in attention_modules(tiny))
    torch.testing.assert_close(vanilla(tiny, ids), before, atol=0, rtol=0)


def test_reversible_after_an_exception(tiny):
    impl = tiny.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), enable_reattention(tiny, WIDE_LOCAL):
        raise RuntimeError("boom")
    assert tiny.config._attn_implementation == impl
    assert not rotary_module(tiny)._forward_hooks


def test_llama3_rope_scaling_matches_vanilla():
    """llama3-type scaled RoPE is re-applied with the model's own frequencies."""
    model = tiny_model(
        "llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )
    assert rotary_module(model).rope_type == "llama3"
    ids = random_ids(150)
    torch.testing.assert_close(run_chunked(model, ids, WIDE_BLOCKS, 16), vanilla(model, ids), atol=ATOL, rtol=0)


def test_yarn_attention_scaling_matches_vanilla():
    """YaRN multiplies cos/sin by an attention scaling != 1, which must be re-applied too."""
    model = tiny_model(
        "qwen2",
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    )
    assert rotary_module(model).attention_scaling != 1.0
    ids = random_ids(150)
    torch.testing.assert_close(run_chunked(model, ids, WIDE_BLOCKS, 16), vanilla(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_yarn_full_mode_matches_the_model_loaded_with_yarn(arch):
    """``mode="full", yarn_factor=F`` on a plain-RoPE model computes what transformers computes for the
    same weights loaded with ``rope_type="yarn"`` (Qwen's recipe for contexts past 32K), past the window."""
    plain = tiny_model(arch, max_position_embeddings=64)
    yarn = tiny_model(
        arch,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    yarn.load_state_dict(plain.state_dict())
    ids = random_ids(200)
    cfg = ReAttentionConfig(mode="full", yarn_factor=4, local_window=64, prefill_chunk_size=32)
    out = run_chunked(plain, ids, cfg, 32)
    torch.testing.assert_close(out, vanilla(yarn, ids), atol=ATOL, rtol=0)
    # and it is not the plain model's RoPE
    assert (out - vanilla(plain, ids)).abs().max() > 1e-3


def test_yarn_on_a_model_that_already_scales_its_rope_is_refused():
    from reattention_core.errors import UnsupportedModelError

    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="already scales its RoPE"):
        run_chunked(model, random_ids(8), ReAttentionConfig(mode="full", yarn_factor=4.0), 8)
