from __future__ import annotations

import pytest
import torch

from reattention_core.errors import InvalidInputError
from reattention_core.generation.sampling import Sampler, SamplingParams
from reattention_core.generation.text import TextAssembler
from tests.helpers import ByteTokenizer


def feed(text: str, stop: tuple[str, ...]) -> tuple[list[str], TextAssembler]:
    asm = TextAssembler(ByteTokenizer(), stop)
    pieces = []
    for b in text.encode():
        pieces.append(asm.push(b + 3))
        if asm.stopped:
            break
    pieces.append(asm.finish())
    return [p for p in pieces if p], asm


def test_stop_string_is_cut_and_never_leaked():
    pieces, asm = feed("Paris.\nQuestion: next", ("\nQuestion:",))
    assert "".join(pieces) == "Paris." and asm.stopped and asm.text == "Paris."
    # the held-back prefix "\nQu..." was never emitted piecewise
    assert all("\n" not in p for p in pieces)


def test_multi_token_stop_sequences_match_across_tokens():
    pieces, asm = feed("one two STOP three", ("STOP", "never"))
    assert asm.text == "one two " and "".join(pieces) == "one two "


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    pieces, asm = feed("a \nQb", ("\nQuestion",))
    assert "".join(pieces) == "a \nQb" and not asm.stopped


def test_incomplete_utf8_is_held_back():
    asm = TextAssembler(ByteTokenizer(), ())
    first, second = "é".encode()
    assert asm.push(first + 3) == ""
    assert asm.push(second + 3) == "é"


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits) == 1
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    a = Sampler(SamplingParams(temperature=1.5, seed=3))
    b = Sampler(SamplingParams(temperature=1.5, seed=3))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.9, 0.0, -2.0])
    s = Sampler(SamplingParams(temperature=2.0, top_k=2, seed=0))
    assert {s(logits) for _ in range(200)} <= {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=0))
    assert {s(logits) for _ in range(50)} == {0}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"stop": ("",)}, "stop"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_bad_sampling_params_raise_typed_errors(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        SamplingParams(**kwargs)


def test_sampling_options_come_once_as_params_or_as_keywords():
    params = SamplingParams.of(max_new_tokens=5, temperature=0.5, stop="x")
    assert params == SamplingParams(max_new_tokens=5, temperature=0.5, stop=("x",))
    assert SamplingParams.of(params) is params
    with pytest.raises(InvalidInputError, match="not both"):
        SamplingParams.of(params, top_k=3)
    with pytest.raises(TypeError, match="max_tokens"):
        SamplingParams.of(max_tokens=5)
    with pytest.raises(InvalidInputError, match="temperature"):
        SamplingParams.of(temperature=-1.0)


def test_the_engine_takes_sampling_params_as_its_keywords():
    from reattention_core import ReAttentionConfig, ReAttentionEngine
    from tests.helpers import tiny_model

    cfg = ReAttentionConfig(sink_size=4, block_size=4, top_k=1, max_blocks=2, local_window=32, prefill_chunk_size=16)
    engine = ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), cfg, cache=False)
    by_keywords = engine.generate("abc " * 20, max_new_tokens=4, temperature=0.8, seed=3)
    by_params = engine.generate("abc " * 20, sampling=SamplingParams(max_new_tokens=4, temperature=0.8, seed=3))
    assert by_params.token_ids == by_keywords.token_ids and by_params.completion_tokens == 4
    assert engine.prepare("abc", sampling=SamplingParams(max_new_tokens=2)).params.max_new_tokens == 2
    with pytest.raises(TypeError, match="max_tokens"):
        engine.stream("abc", max_tokens=4)
