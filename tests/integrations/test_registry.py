"""The engine registry: normalised settings, one engine per settings, loaded once, config overrides."""

from __future__ import annotations

import threading

import pytest
import torch

from reattention_core import ConfigError, ReAttentionEngine
from reattention_integrations import EngineSettings, register_engine, shared_engine
from reattention_integrations.langchain import ChatReAttention, ReAttentionLLM
from reattention_integrations.llama_index import ReAttentionLLM as LlamaIndexLLM


def test_equal_settings_share_one_engine(tiny_engine, tmp_path):
    settings = EngineSettings.create("tiny-shared", device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    assert settings == EngineSettings.create("tiny-shared", device="cpu", dtype="fp32", cache_dir=str(tmp_path))
    assert register_engine(settings, tiny_engine) is tiny_engine
    a = ChatReAttention(model="tiny-shared", device="cpu", dtype="float32", cache_dir=str(tmp_path))
    b = ReAttentionLLM(model="tiny-shared", device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    assert a.get_engine() is b.get_engine() is tiny_engine is shared_engine(settings)
    other = ChatReAttention(model="tiny-shared", device="cpu", dtype="bfloat16", cache_dir=str(tmp_path))
    assert other._settings != settings  # another dtype is another engine


def test_registry_loads_once_under_concurrent_first_use(tiny_engine, monkeypatch):
    builds = []
    gate = threading.Event()

    def slow_build(self):
        builds.append(self)
        gate.wait(5)
        return tiny_engine

    monkeypatch.setattr(EngineSettings, "build", slow_build)
    settings = EngineSettings.create("tiny-concurrent", device="cpu")
    got: list[ReAttentionEngine] = []
    threads = [threading.Thread(target=lambda: got.append(shared_engine(settings))) for _ in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and len(got) == 6 and all(e is tiny_engine for e in got)


def test_config_dicts_override_the_models_default_config(tiny_engine, monkeypatch):
    monkeypatch.setattr(ReAttentionEngine, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_engine))
    settings = EngineSettings.create("tiny-overrides", config={"max_context": 5000, "max_blocks": 8})
    assert settings.max_context == 5000 and settings.config is None
    built = settings.build()
    assert built.model is tiny_engine.model and built.config == tiny_engine.config.replace(
        max_context=5000, max_blocks=8
    )
    assert LlamaIndexLLM(model="tiny-overrides", config={"max_context": 5000}).metadata.context_window == 5000


def test_settings_errors_are_typed_and_say_what_to_do():
    with pytest.raises(ConfigError, match="valid keys"):
        EngineSettings.create(config={"sink": 4})
    with pytest.raises(ConfigError, match="must be an int"):
        EngineSettings.create(config={"sink_size": "4"})  # checked against the embedded preset now
    with pytest.raises(ConfigError, match="'cpu', 'cuda'"):
        EngineSettings.create(device="tpu:0")
    with pytest.raises(ConfigError, match="needs model="):
        EngineSettings.create(gguf_file="x.gguf")
