"""The disk cache reads pages written before the package layout moved (format 2, `data/format2`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reattention_core import CacheConfig, ReAttentionConfig, ReAttentionEngine
from reattention_core.cache.fingerprint import FORMAT_VERSION
from tests.helpers import ByteTokenizer, tiny_model

DATA = Path(__file__).with_name("data") / "format2"
CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=6, local_window=32, prefill_chunk_size=16)


def test_pages_written_by_the_earlier_code_are_restored_and_answer_as_it_did(tmp_path):
    expected = json.loads((DATA / "expected.json").read_text())
    folder = tmp_path / "pages"
    shutil.copytree(DATA / "pages", folder)  # a run touches and may evict pages: never the committed ones
    engine = ReAttentionEngine(
        tiny_model("llama"), ByteTokenizer(), CFG, cache=CacheConfig(dir=folder, page_size=32, disk_bytes=1 << 20)
    )
    assert FORMAT_VERSION == 2
    assert (
        folder / engine._prefix.fingerprint(engine._settings()).namespace
    ).is_dir()  # the same fingerprint names the same folder
    res = engine.generate(expected["question"], context=expected["corpus"], max_new_tokens=expected["max_new_tokens"])
    assert res.cached_tokens == expected["stored_tokens"]  # every page restored from disk, none rejected
    assert list(res.token_ids) == expected["token_ids"]
