"""The conversion cache of GGUF checkpoints (`reattention_core.model_cache`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from reattention_core import model_cache
from reattention_core.cache.fingerprint import model_fingerprint, tokenizer_fingerprint
from tests.helpers import tiny_model


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "models"
    monkeypatch.setenv(model_cache.ENV_DIR, str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "weights" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return path


class _Tokenizer:
    """Stands in for a tokenizer: `save_pretrained` writes one file."""

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / "tokenizer.json").write_text('{"stand-in": true}')


def test_the_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(model_cache.ENV_DIR, str(tmp_path / "x"))
    assert model_cache.model_cache_dir() == tmp_path / "x"
    for off in ("off", "0", "OFF", "none"):
        monkeypatch.setenv(model_cache.ENV_DIR, off)
        assert model_cache.model_cache_dir() is None
    monkeypatch.delenv(model_cache.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.model_cache_dir() == tmp_path / "xdg" / "reattention-models"


def test_the_key_changes_with_the_file_the_dtype_and_nothing_else(fake_gguf: Path) -> None:
    a = model_cache.ConversionSource.of(fake_gguf, torch.float32)
    assert model_cache.ConversionSource.of(fake_gguf, torch.float32).key == a.key
    assert model_cache.ConversionSource.of(fake_gguf, torch.bfloat16).key != a.key
    os.utime(fake_gguf, ns=(a.mtime_ns + 10**9, a.mtime_ns + 10**9))
    assert model_cache.ConversionSource.of(fake_gguf, torch.float32).key != a.key
    data = bytearray(fake_gguf.read_bytes())
    data[100] ^= 1  # same size, same time, other contents
    fake_gguf.write_bytes(bytes(data))
    os.utime(fake_gguf, ns=(a.mtime_ns, a.mtime_ns))
    assert model_cache.ConversionSource.of(fake_gguf, torch.float32).key != a.key


def test_a_saved_conversion_is_found_and_loads_the_same_weights(cache_root: Path, fake_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", tie_word_embeddings=True)
    assert model_cache.find(fake_gguf, torch.float32) is None
    folder = model_cache.save(model, _Tokenizer(), fake_gguf, torch.float32)
    assert folder is not None and model_cache.find(fake_gguf, torch.float32) == folder
    assert model_cache.find(fake_gguf, torch.float16) is None  # another dtype is another conversion
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [p for p in cache_root.iterdir() if p.name.startswith(model_cache.TMP_PREFIX)]
    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model_fingerprint(back) == model_fingerprint(model)


def test_incomplete_or_stale_conversions_are_not_used(cache_root: Path, fake_gguf: Path) -> None:
    model = tiny_model("qwen2")
    folder = model_cache.save(model, _Tokenizer(), fake_gguf, torch.float32)
    weights = folder / model_cache.WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])  # truncated (a full disk, a killed copy)
    assert model_cache.find(fake_gguf, torch.float32) is None
    weights.write_bytes(data)
    assert model_cache.find(fake_gguf, torch.float32) == folder
    (folder / model_cache.MANIFEST).unlink()  # the manifest is written last: without it, nothing counts
    assert model_cache.find(fake_gguf, torch.float32) is None
    # Saving again replaces the incomplete folder under the same key.
    assert model_cache.save(model, _Tokenizer(), fake_gguf, torch.float32) == folder
    assert model_cache.find(fake_gguf, torch.float32) == folder
    # The GGUF file changes: the old conversion no longer matches, and the new one replaces it on disk.
    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"more")
    assert model_cache.find(fake_gguf, torch.float32) is None
    new = model_cache.save(model, _Tokenizer(), fake_gguf, torch.float32)
    assert new is not None and new != folder and not folder.exists()
    assert [p.name for p in cache_root.iterdir()] == [new.name]


def test_stale_temporary_folders_are_swept(cache_root: Path, fake_gguf: Path) -> None:
    cache_root.mkdir()
    stale = cache_root / f"{model_cache.TMP_PREFIX}killed"
    fresh = cache_root / f"{model_cache.TMP_PREFIX}running"
    stale.mkdir()
    fresh.mkdir()
    old = stale.stat().st_mtime - model_cache.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    model_cache.save(tiny_model("llama"), _Tokenizer(), fake_gguf, torch.float32)
    assert not stale.exists() and fresh.exists()  # another process may still be writing the fresh one


def test_an_unwritable_cache_warns_and_returns_none(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(model_cache.ENV_DIR, str(blocker / "models"))
    with caplog.at_level(logging.WARNING, logger="reattention"):
        assert model_cache.save(tiny_model("llama"), _Tokenizer(), fake_gguf, torch.float32) is None
    assert model_cache.ENV_DIR in caplog.text
    monkeypatch.setenv(model_cache.ENV_DIR, "off")
    assert model_cache.save(tiny_model("llama"), _Tokenizer(), fake_gguf, torch.float32) is None
    assert model_cache.find(fake_gguf, torch.float32) is None


# -- the embedded model, end to end ------------------------------------------------------------------


@pytest.mark.slow
def test_the_embedded_model_loads_from_its_conversion_with_identical_results(
    cache_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from reattention_core import ReAttentionEngine
    from reattention_core.embedded import embedded_model_file

    gguf = embedded_model_file()
    first = ReAttentionEngine.from_pretrained(cache=False)  # reads the GGUF file and converts it
    dtype = first.model.dtype  # fp32 on CPU, bf16 on a GPU
    folder = model_cache.find(gguf, dtype)
    assert folder is not None
    second = ReAttentionEngine.from_pretrained(cache=False)  # reads the conversion
    assert Path(second.model.config._name_or_path) == folder
    assert second.model_name == first.model_name and second.config == first.config

    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model_fingerprint(first.model) == model_fingerprint(second.model)  # prefix-cache pages are shared
    assert tokenizer_fingerprint(first.tokenizer) == tokenizer_fingerprint(second.tokenizer)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word. 日本語 café"}]
    assert first.encode(chat) == second.encode(chat)
    ids = torch.tensor([first.encode(chat)], device=first.device)
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert first.generate(chat, max_new_tokens=6).token_ids == second.generate(chat, max_new_tokens=6).token_ids

    # A conversion that no longer loads (damaged on disk, same size) is dropped and rebuilt from the GGUF file.
    weights = folder / model_cache.WEIGHTS
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)
    with caplog.at_level(logging.WARNING, logger="reattention"):
        third = ReAttentionEngine.from_pretrained(cache=False)
    assert "does not load" in caplog.text
    assert model_cache.find(gguf, dtype) == folder and weights.stat().st_size == size
    c = third.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_conversion_that_another_process_renamed_first_is_kept(
    cache_root: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model("llama")
    theirs = model_cache.save(model, _Tokenizer(), fake_gguf, torch.float32)
    real_rename, real_complete, calls = os.rename, model_cache._complete, {"n": 0}

    def complete_late(folder: Path, source: model_cache.ConversionSource) -> bool:
        calls["n"] += 1  # the first check (before the rename) misses: the other process is not done yet
        return calls["n"] > 1 and real_complete(folder, source)

    def rename_lost(src: Path, dst: Path) -> None:
        raise FileExistsError(f"{dst} exists")  # the other process renamed its copy into place first

    monkeypatch.setattr(model_cache, "_complete", complete_late)
    monkeypatch.setattr(model_cache.os, "rename", rename_lost)
    monkeypatch.setattr(model_cache, "discard", lambda folder: None)  # as if the folder appeared after the check
    with caplog.at_level(logging.WARNING, logger="reattention"):
        assert model_cache.save(model, _Tokenizer(), fake_gguf, torch.float32) == theirs
    assert not caplog.text  # not a failure: the conversion is there
    monkeypatch.setattr(model_cache.os, "rename", real_rename)
    assert model_cache.find(fake_gguf, torch.float32) == theirs
    assert [p.name for p in cache_root.iterdir()] == [theirs.name]  # our temporary copy is gone
