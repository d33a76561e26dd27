"""Long texts are tokenised in parallel pieces only where that gives exactly the ids of one call."""

from __future__ import annotations

import pydoc
import random
import re

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from reattention_core import tokenization


def _docs() -> str:
    import bisect
    import heapq
    import json

    return "\n\n".join(pydoc.render_doc(m, renderer=pydoc.plaintext) for m in (bisect, heapq, json))


def _awkward(seed: int = 0) -> str:
    """Text with what tokenizers treat specially: runs of spaces and newlines, tabs, digits, accents
    and combining marks, CJK without spaces, emoji, punctuation runs, contractions."""
    rng = random.Random(seed)
    bits = [
        "word",
        "  two  spaces",
        "\n\n",
        "\t\tindented",
        "12345678",
        "3.14159",
        "naïve café",
        "e\u0301",
        "日本語の文章です",
        "😀👍🏽",
        "...!!!",
        "it's they're",
        " \n ",
        "x=1;y=2",
        "CamelCase",
        "   ",
    ]
    return "".join(rng.choice(bits) + rng.choice(["", " ", "  ", "\n"]) for _ in range(1500))


def _train(normalizer=None, pre=None, post_bos: bool = False) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token="<unk>" if pre is None else None))
    if normalizer is not None:
        tk.normalizer = normalizer
    if pre is not None:
        tk.pre_tokenizer = pre
        tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if pre is not None else []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet)
    tk.train_from_iterator([_docs(), _awkward(1)], trainer)
    if post_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from transformers import AutoTokenizer

    from reattention_core.embedded import embedded_model_file

    path = embedded_model_file()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _spy(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = tokenization._encode_pieces

    def spy(tokenizer, text, cuts, *args):
        calls.append(len(cuts))
        return real(tokenizer, text, cuts, *args)

    monkeypatch.setattr(tokenization, "_encode_pieces", spy)
    return calls


def _check(tok, text: str, *, special: bool, cuts: list[int]) -> None:
    whole = list(tok(text, add_special_tokens=special)["input_ids"])
    assert tokenization.encode(tok, text, add_special_tokens=special, piece_chars=400)[0] == whole
    for cut in cuts:
        offsets = tok(text, add_special_tokens=special, return_offsets_mapping=True)["offset_mapping"]
        n = 0
        while n < len(offsets) and offsets[n][1] <= cut:  # leading tokens that end at or before the cut
            n += 1
        want = n if 0 < n < len(whole) else None
        assert tokenization.encode(tok, text, add_special_tokens=special, cut=cut, piece_chars=400) == (whole, want)


@pytest.mark.parametrize("kind", ["docs", "awkward"])
def test_the_embedded_tokenizer_is_cut_into_pieces_with_identical_ids(embedded_tokenizer, monkeypatch, kind):
    text = _docs() if kind == "docs" else _awkward()
    calls = _spy(monkeypatch)
    _check(embedded_tokenizer, text, special=False, cuts=[len(text) // 3, len(text) - 20])
    assert calls and min(calls) >= 10  # the pieces were used, not the one-call fallback


def test_a_byte_level_tokenizer_with_bos_keeps_it_once(monkeypatch):
    tok = _train(pre=pre_tokenizers.ByteLevel(add_prefix_space=False), post_bos=True)
    calls = _spy(monkeypatch)
    text = _docs()
    ids = tokenization.encode(tok, text, add_special_tokens=True, piece_chars=400)[0]
    assert ids[0] == 1 and ids.count(1) == 1
    _check(tok, text, special=True, cuts=[len(text) - 50])
    assert calls


def test_a_byte_level_tokenizer_that_adds_a_prefix_space_is_cut_too(monkeypatch):
    """Pieces start with a space, so no prefix space is added to them: the cuts stay exact."""
    tok = _train(pre=pre_tokenizers.ByteLevel(add_prefix_space=True))
    calls = _spy(monkeypatch)
    _check(tok, _docs(), special=False, cuts=[777])
    assert calls


def test_a_tokenizer_that_merges_across_cuts_is_encoded_whole(monkeypatch):
    """Llama 2's normalizer prepends a word marker to every string it is given, so a piece that starts
    with a space would get two markers: every cut fails its check and the text takes one call."""
    tok = _train(normalizer=normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]))
    text = _docs()
    cut = re.compile(r"(?<=\S) ").search(text, 5000).start()
    halves = [tok(part, add_special_tokens=False)["input_ids"] for part in (text[:cut], text[cut:])]
    assert halves[0] + halves[1] != tok(text, add_special_tokens=False)["input_ids"]  # cutting would be wrong
    calls = _spy(monkeypatch)
    _check(tok, text, special=False, cuts=[len(text) - 50])
    assert not calls


def test_short_texts_and_slow_tokenizers_take_one_call(monkeypatch, byte_tokenizer):
    calls = _spy(monkeypatch)
    text = _docs()
    assert tokenization.encode(byte_tokenizer, text, add_special_tokens=True)[0] == byte_tokenizer(text)["input_ids"]
    ids, boundary = tokenization.encode(byte_tokenizer, text, add_special_tokens=True, cut=100, piece_chars=400)
    tail = byte_tokenizer(text[100:], add_special_tokens=False)["input_ids"]
    assert ids == byte_tokenizer(text)["input_ids"] and boundary == len(ids) - len(tail)  # no offsets: by suffix
    assert not calls
