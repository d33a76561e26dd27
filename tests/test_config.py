from __future__ import annotations

import pytest

from reattention_core import PRESETS, ConfigError, ReAttentionConfig


def test_defaults_are_the_papers_8k_sizing():
    cfg = ReAttentionConfig.for_window(8192)
    assert (cfg.sink_size, cfg.block_size, cfg.top_k, cfg.local_window) == (32, 32, 4, 4096)
    assert cfg.max_blocks == 127 and cfg.prefill_chunk_size == 512
    assert cfg.scope_size == 8192
    cfg.check_window(8192)


def test_for_window_small_window_keeps_chunk_inside_local():
    cfg = ReAttentionConfig.for_window(512)
    assert cfg.prefill_chunk_size <= cfg.local_window
    assert cfg.scope_size <= 512


def test_scope_over_the_window_is_rejected_with_a_hint():
    cfg = ReAttentionConfig(max_blocks=200)
    with pytest.raises(ConfigError, match="exceeds the model's pre-training window of 8192.*for_window"):
        cfg.check_window(8192)


def test_full_mode_has_no_scope_bound():
    cfg = ReAttentionConfig(mode="full", max_blocks=10_000)
    assert cfg.scope_size is None
    cfg.check_window(128)


def test_streaming_scope_is_sink_plus_local():
    assert ReAttentionConfig(mode="streaming", sink_size=8, local_window=64, prefill_chunk_size=64).scope_size == 72


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "sparse"}, "mode must be one of"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"top_k": -1}, "top_k must be >= 1"),
        ({"sink_size": -1}, "sink_size must be >= 0"),
        ({"local_window": 2.5}, "local_window must be an int"),
        ({"max_blocks": True}, "max_blocks must be an int"),
        ({"prefill_chunk_size": 1024, "local_window": 512}, "exceeds local_window"),
        ({"max_context": 0}, "max_context"),
        ({"prefill_vote_stride": 0}, "prefill_vote_stride must be >= 1"),
        ({"prefill_vote_stride": 2.0}, "prefill_vote_stride must be an int"),
    ],
)
def test_invalid_values_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReAttentionConfig(**kwargs)


def test_config_is_frozen():
    cfg = ReAttentionConfig()
    with pytest.raises(AttributeError):
        cfg.top_k = 3  # type: ignore[misc]


def test_unknown_keys_raise():
    with pytest.raises(ConfigError, match="unknown ReAttentionConfig keys.*topk"):
        ReAttentionConfig.from_dict({"topk": 3})
    with pytest.raises(TypeError):
        ReAttentionConfig(topk=3)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="unknown"):
        ReAttentionConfig().replace(windw=3)


def test_round_trip_and_fingerprint():
    cfg = ReAttentionConfig.preset("smollm2-135m")
    again = ReAttentionConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert cfg.replace(top_k=2).fingerprint() != cfg.fingerprint()


def test_a_vote_stride_changes_the_fingerprint_and_the_default_keeps_saved_ones():
    # fingerprints of these configs before `prefill_vote_stride` existed (336b802): caches saved
    # then must still match at the default stride
    assert ReAttentionConfig().fingerprint() == "81290f492fc1c87d"
    assert ReAttentionConfig.preset("smollm2-135m").fingerprint() == "f3d30236e990bcfd"
    strided = ReAttentionConfig(prefill_vote_stride=4)
    assert strided.fingerprint() != ReAttentionConfig().fingerprint()
    assert ReAttentionConfig.from_dict(strided.to_dict()) == strided


def test_embedded_preset_is_the_measured_one():
    cfg = PRESETS["smollm2-135m"]
    assert (cfg.sink_size, cfg.max_blocks, cfg.block_size, cfg.local_window, cfg.prefill_chunk_size) == (
        64,
        32,
        32,
        256,
        256,
    )
    assert cfg.scope_size == 1344
    with pytest.raises(ConfigError, match="unknown preset"):
        ReAttentionConfig.preset("gpt-5")


def test_long_window_models_get_the_papers_16k_scope():
    cfg = ReAttentionConfig.for_window(131072)
    assert (cfg.local_window, cfg.max_blocks, cfg.scope_size) == (8192, 256, 16416)
    assert ReAttentionConfig.for_window(32768).scope_size == 16416


def test_yarn_factor_is_validated_stretches_the_window_and_keeps_saved_fingerprints():
    import hashlib
    import json

    cfg = ReAttentionConfig(mode="full", yarn_factor=4)
    assert cfg.yarn_factor == 4.0 and isinstance(cfg.yarn_factor, float)
    assert cfg.window_for(32768) == 131072 and ReAttentionConfig().window_for(32768) == 32768
    # a scope that needs the stretched window passes only with it
    wide = ReAttentionConfig(sink_size=32, max_blocks=256, block_size=32, local_window=8192)
    with pytest.raises(ConfigError, match="pre-training window of 8192"):
        wide.check_window(8192)
    with pytest.raises(ConfigError, match=r"window of 8192 positions \(x2 with YaRN: 16384\)"):
        wide.replace(yarn_factor=2.0).check_window(8192)
    wide.replace(yarn_factor=2.5).check_window(8192)
    # the default hashes as configs did before the field existed, so saved caches stay valid
    base = ReAttentionConfig(mode="full")
    old = {k: v for k, v in base.to_dict().items() if k not in ("prefill_vote_stride", "yarn_factor")}
    assert base.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() != base.fingerprint() != cfg.replace(yarn_factor=2.0).fingerprint()
    for bad in (1.0, 0.5, -2, True, "4", float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="yarn_factor"):
            ReAttentionConfig(mode="full", yarn_factor=bad)
    assert ReAttentionConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_for_finds_a_preset_named_in_a_model_path():
    from reattention_core.config import preset_for

    assert preset_for(None) == "smollm2-135m"  # the embedded model
    assert preset_for("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert preset_for("/models/SmolLM2_135M/model.gguf") == "smollm2-135m"  # underscores and case aside
    assert preset_for("meta-llama/Llama-3.1-8B") is None
    assert preset_for("/root/qwen2.5-coder-1.5b/model.gguf") == "qwen2.5-coder-1.5b"
    assert preset_for("/root/qwen2.5-coder-0.5b/model.gguf") is None  # not measured: the window's sizing
    assert all(preset_for(f"/models/{name.upper()}-instruct/x.gguf") == name for name in PRESETS)


def test_qwen_preset_is_the_papers_sizing_for_its_window():
    cfg = ReAttentionConfig.preset("qwen2.5-coder-1.5b")
    assert cfg == ReAttentionConfig.for_window(32768)
    assert cfg.sink_size + cfg.max_blocks * cfg.block_size + cfg.local_window == 16416
    cfg.check_window(32768)
    with pytest.raises(ConfigError):
        cfg.check_window(8192)  # the scope does not fit a smaller model's window
