"""``reattention eval trace``: a selection observer records what each layer selects, without changing it."""

from __future__ import annotations

import json

from reattention_core import ReAttentionConfig, ReAttentionEngine
from reattention_core.evaluation import trace
from tests.helpers import ByteTokenizer, tiny_model

CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=3, local_window=16, prefill_chunk_size=8)


def test_an_observed_generation_gives_the_same_tokens_and_reports_every_layer():
    engine = ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), CFG, cache=False)
    prompt = "the quick brown fox jumps over the lazy dog. " * 3
    want = engine.generate(prompt, max_new_tokens=4).token_ids
    recorder = trace.SelectionRecorder(check_reference=True)
    got = engine.start(engine.prepare(prompt, max_new_tokens=4), observer=recorder).collect()
    assert got.token_ids == want
    layers = engine.model.config.num_hidden_layers
    assert len(recorder.calls) == 4 * layers  # the prompt's last token and three decode steps, every layer
    total = len(engine.encode(prompt))
    for entry in recorder.calls:
        assert entry["sel"] == sorted(entry["sel"]) and all(CFG.sink_size <= p < total for p in entry["sel"])
        assert entry["hits"] and entry["ref_mismatch"] == 0


def test_eval_trace_reports_where_the_needle_is_at_every_layer(embedded_engine, tmp_path, monkeypatch, capsys):
    from reattention_core.app.cli import main
    from reattention_core.evaluation import cli as eval_cli

    monkeypatch.setattr(eval_cli, "_engine", lambda args, cache: embedded_engine)
    out = tmp_path / "trace.json"
    args = ["eval", "trace", "--length", "2K", "--depth", "0.5", "--steps", "1", "--check-reference", "--out", str(out)]
    assert main(args) == 0
    (rec,) = json.loads(out.read_text())["records"]
    layers = embedded_engine.model.config.num_hidden_layers
    assert len(rec["steps"]) == 2 and all(len(step) == layers for step in rec["steps"])
    first = rec["steps"][0]
    assert all(row["ref_mismatch"] == 0 for row in first)
    # at half of 2K tokens the key is neither in the sink nor in the local window: found means selected
    assert not rec["correct"] or any(row["key"] > 0 for row in first)
    assert "depth 0.5:" in capsys.readouterr().out
