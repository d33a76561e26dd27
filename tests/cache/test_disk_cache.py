"""Prefix cache on disk: reuse across processes, fingerprint misses, corruption, concurrency,
eviction, interruption."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from reattention_core import CacheConfig, ReAttentionConfig, ReAttentionEngine, ResidentStore
from reattention_core.cache import directory, disk, page_file
from reattention_core.cache.fingerprint import model_fingerprint, tokenizer_fingerprint
from reattention_core.errors import PageError
from reattention_core.safe_files import create_temporary
from tests.helpers import ByteTokenizer, tiny_model, word_text

ROOT = Path(__file__).resolve().parents[2]
CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=4, local_window=32, prefill_chunk_size=16)
PAGE = 64

# A second process: the same tiny model (same seed) and cache directory.
CHILD = r"""
import json, os, pathlib, sys, time
from tests.helpers import ByteTokenizer, tiny_model
from reattention_core import CacheConfig, ReAttentionConfig, ReAttentionEngine
a = json.loads(sys.argv[1])
engine = ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), ReAttentionConfig(**a["config"]),
                           cache=CacheConfig(page_size=a["page"], dir=a["dir"], disk_bytes=a["cap"]))
if a["barrier"]:  # start generating together with the other process
    barrier = pathlib.Path(a["barrier"][0])
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 60
    while len(list(barrier.iterdir())) < a["barrier"][1] and time.time() < deadline:
        time.sleep(0.01)
out = []
for prompt in a["prompts"]:
    r = engine.generate(prompt, max_new_tokens=4)
    out.append({"ids": list(r.token_ids), "cached": r.cached_tokens})
print(json.dumps(out))
"""


def child(
    cache_dir: Path, prompts: list[str], cap: int | None = None, barrier: tuple[Path, int] | None = None
) -> subprocess.Popen:
    args = json.dumps(
        {
            "config": CFG.to_dict(),
            "page": PAGE,
            "dir": str(cache_dir),
            "cap": cap,
            "prompts": prompts,
            "barrier": [str(barrier[0]), barrier[1]] if barrier else None,
        }
    )
    # the checkout first, then whatever the parent had: the child imports what this process imports
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def child_result(proc: subprocess.Popen) -> list[dict]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def make_engine(cache_dir: Path, *, model=None, config: ReAttentionConfig = CFG, **cache_kw) -> ReAttentionEngine:
    cache = CacheConfig(page_size=PAGE, dir=cache_dir, **cache_kw)
    return ReAttentionEngine(model if model is not None else tiny_model("llama"), ByteTokenizer(), config, cache=cache)


def pages(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/p*.safetensors"))


def temp_files(cache_dir: Path) -> list[Path]:
    return list(cache_dir.glob("*/.tmp-*"))


def verify_all(cache_dir: Path) -> None:
    """Every page file on disk passes the loader's full verification."""
    for path in pages(cache_dir):
        meta = page_file.read_header(path)["__metadata__"]
        ref = page_file.PageRef(path, meta["key"], meta["parent"], int(meta["index"]), int(meta["tokens"]))
        page_file.read_page(ref, meta["fingerprint"], 2, torch.float32)


PROMPT = word_text(5 * PAGE + 20, seed=1)  # 5 cacheable pages


@pytest.fixture(scope="module")
def cold_ids() -> tuple[int, ...]:
    engine = ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), CFG, cache=False)
    return engine.generate(PROMPT, max_new_tokens=4).token_ids


def test_pages_are_checksummed_safetensors_files(tmp_path):
    engine = make_engine(tmp_path)
    engine.generate(PROMPT, max_new_tokens=2)
    files = pages(tmp_path)
    assert [p.name[:7] for p in files] == [f"p00000{i}" for i in range(5)]
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("k.0").shape == (PAGE, 2, 16)
        both = torch.stack([f.get_tensor(f"{kind}.{i}") for kind in "kv" for i in range(2)])
    assert int(meta["crc32"]) == zlib.crc32(both.numpy().tobytes())  # the data section, k.0 k.1 v.0 v.1
    assert files[0].read_bytes().endswith(both.numpy().tobytes())
    manifest = json.loads((files[0].parent / "manifest.json").read_text())
    assert manifest["fingerprint"] == meta["fingerprint"] and manifest["components"]["dtype"] == "float32"
    info = engine.cache_info().disk
    assert (info.entries, info.pages, info.tokens) == (1, 5, 5 * PAGE) and info.bytes == info.total_bytes > 0
    assert not temp_files(tmp_path)


def test_a_second_process_reuses_the_pages(tmp_path, cold_ids):
    first = make_engine(tmp_path).generate(PROMPT, max_new_tokens=4)
    assert first.token_ids == cold_ids and first.cached_tokens == 0
    (res,) = child_result(child(tmp_path, [PROMPT]))
    assert res["cached"] == 5 * PAGE and tuple(res["ids"]) == cold_ids


def test_fingerprint_mismatch_is_a_miss_with_the_reason(tmp_path, caplog):
    make_engine(tmp_path).generate(PROMPT, max_new_tokens=2)
    caplog.set_level(logging.INFO, logger="reattention")
    other_cfg = make_engine(tmp_path, config=CFG.replace(top_k=3))
    assert other_cfg.generate(PROMPT, max_new_tokens=2).cached_tokens == 0
    assert "differs in config (top_k 2 -> 3)" in caplog.text
    caplog.clear()
    other_model = make_engine(tmp_path, model=tiny_model("llama", seed=1))
    assert other_model.generate(PROMPT, max_new_tokens=2).cached_tokens == 0
    assert "differs in model" in caplog.text
    assert (
        make_engine(tmp_path, config=CFG.replace(max_context=10_000)).generate(PROMPT, max_new_tokens=2).cached_tokens
        == 5 * PAGE
    )


def test_fingerprints_follow_weights_and_tokenizer():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight.mul_(1.001)
    assert model_fingerprint(a) != model_fingerprint(b)
    tok = ByteTokenizer()
    before = tokenizer_fingerprint(tok)
    tok.chat_template = "other"
    assert tokenizer_fingerprint(tok) != before


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    if how == "truncated":
        data = data[: len(data) - 1000]
    elif how == "bit flip in data":
        data[-1234] ^= 0x10
    elif how == "bit flip in header":
        data[8 + header // 2] ^= 0x01
    elif how == "half written":
        data = data[: len(data) // 2]
    elif how == "another page's file":
        data = bytearray(next(path.parent.glob("p000002-*")).read_bytes())
    elif how == "layers swapped in the header":  # same bytes, same CRC: only the layout check can tell
        meta = json.loads(bytes(data[8 : 8 + header]))
        meta["k.0"]["data_offsets"], meta["k.1"]["data_offsets"] = (
            meta["k.1"]["data_offsets"],
            meta["k.0"]["data_offsets"],
        )
        raw = json.dumps(meta, separators=(",", ":")).encode().ljust(header)
        assert len(raw) == header
        data[8 : 8 + header] = raw
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["truncated", "bit flip in data", "bit flip in header", "half written", "another page's file"]
)
def test_a_damaged_page_is_dropped_and_recomputed(tmp_path, cold_ids, caplog, how):
    model = tiny_model("llama")
    make_engine(tmp_path, model=model).generate(PROMPT, max_new_tokens=4)
    victim = next(tmp_path.glob("*/p000001-*"))
    _corrupt(victim, how)
    caplog.set_level(logging.WARNING, logger="reattention")
    res = make_engine(tmp_path, model=model).generate(PROMPT, max_new_tokens=4)
    assert res.cached_tokens == PAGE and res.token_ids == cold_ids
    assert f"dropping {victim}" in caplog.text and "recomputed" in caplog.text
    caplog.clear()
    verify_all(tmp_path)  # rewritten whole
    again = make_engine(tmp_path, model=model).generate(PROMPT, max_new_tokens=4)
    assert again.cached_tokens == 5 * PAGE and again.token_ids == cold_ids and not caplog.text


@pytest.mark.parametrize(
    "how", [None, "truncated", "bit flip in data", "bit flip in header", "half written", "layers swapped in the header"]
)
def test_the_staging_reader_checks_pages_like_the_mapping_reader(tmp_path, monkeypatch, how):
    """GPU stores read pages with ``readinto`` into pinned buffers; plain buffers stand in for them here."""
    make_engine(tmp_path).generate(PROMPT, max_new_tokens=1)
    path = next(tmp_path.glob("*/p000001-*"))
    meta = page_file.read_header(path)["__metadata__"]
    ref = page_file.PageRef(path, meta["key"], meta["parent"], int(meta["index"]), int(meta["tokens"]))
    staged: list[int] = []
    monkeypatch.setattr(page_file, "_staging_buffer", lambda n: staged.append(n) or torch.empty(n, dtype=torch.uint8))
    monkeypatch.setattr(page_file, "_HEADER_GUESS", 64)  # also take the path where the header needs a second read
    if how is None:
        mapped = page_file.read_page(ref, meta["fingerprint"], 2, torch.float32)
        read = page_file.read_page(ref, meta["fingerprint"], 2, torch.float32, pin=True)
        assert staged and all(torch.equal(a, b) for a, b in zip(mapped[0] + mapped[1], read[0] + read[1], strict=True))
        return
    _corrupt(path, how)
    for pin in (False, True):
        with pytest.raises(PageError):
            page_file.read_page(ref, meta["fingerprint"], 2, torch.float32, pin=pin)


def test_eviction_keeps_the_cache_under_its_cap_and_cuts_chains_from_the_end(tmp_path, caplog):
    make_engine(tmp_path / "probe").generate(word_text(PAGE + 2, seed=7), max_new_tokens=1)
    page_bytes = pages(tmp_path / "probe")[0].stat().st_size
    cap = int(page_bytes * 3.5)
    caplog.set_level(logging.WARNING, logger="reattention")
    engine = make_engine(tmp_path / "c", disk_bytes=cap)
    engine.generate(PROMPT, max_new_tokens=1)  # 5 pages, only 3 fit
    assert "outgrows the disk cache cap" in caplog.text
    names = [p.name[:7] for p in pages(tmp_path / "c")]
    assert names == ["p000000", "p000001", "p000002"]
    other = word_text(2 * PAGE + 10, seed=8)
    engine.generate(other, max_new_tokens=1)  # 2 more pages: the deepest pages of PROMPT go first
    files = pages(tmp_path / "c")
    assert sum(p.stat().st_size for p in files) <= cap
    assert sorted(p.name[:7] for p in files) == ["p000000", "p000000", "p000001"]
    fresh = make_engine(tmp_path / "c", disk_bytes=cap)
    assert fresh.generate(PROMPT, max_new_tokens=1).cached_tokens == PAGE  # its first page survived
    assert sum(p.stat().st_size for p in pages(tmp_path / "c")) <= cap


def test_concurrent_writers_leave_a_readable_cache(tmp_path, cold_ids):
    b, c = word_text(4 * PAGE + 9, seed=11), word_text(4 * PAGE + 9, seed=12)
    (tmp_path / "barrier").mkdir()
    go = (tmp_path / "barrier", 2)
    procs = [child(tmp_path, [PROMPT, b, PROMPT], barrier=go), child(tmp_path, [c, PROMPT, c], barrier=go)]
    results = [child_result(p) for p in procs]
    assert tuple(results[0][0]["ids"]) == tuple(results[1][1]["ids"]) == cold_ids
    assert results[0][2]["cached"] == 5 * PAGE  # (from memory at least)
    assert not temp_files(tmp_path)
    verify_all(tmp_path)
    res = make_engine(tmp_path).generate(PROMPT, max_new_tokens=4)
    assert res.token_ids == cold_ids


def test_concurrent_writers_respect_a_shared_cap(tmp_path):
    """13 pages written by two processes under a cap of 9: they evict each other's pages."""
    b, c = word_text(4 * PAGE + 9, seed=11), word_text(4 * PAGE + 9, seed=12)
    make_engine(tmp_path / "probe").generate(word_text(PAGE + 2, seed=7), max_new_tokens=1)
    cap = int(pages(tmp_path / "probe")[0].stat().st_size * 9.5)
    (tmp_path / "barrier").mkdir()
    go = (tmp_path / "barrier", 2)
    procs = [
        child(tmp_path / "c", [PROMPT, b], cap=cap, barrier=go),
        child(tmp_path / "c", [c, PROMPT], cap=cap, barrier=go),
    ]
    for p in procs:
        child_result(p)
    assert sum(p.stat().st_size for p in pages(tmp_path / "c")) <= cap
    assert not temp_files(tmp_path / "c")
    verify_all(tmp_path / "c")


class Interrupt:
    """Raise KeyboardInterrupt inside the forward of layer 1 at its ``at``-th call (mid-chunk)."""

    def __init__(self, model: torch.nn.Module, at: int) -> None:
        self.calls, self.at = 0, at
        self.handle = model.model.layers[1].register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def test_interrupted_prefill_leaves_only_complete_pages(tmp_path, cold_ids):
    model = tiny_model("llama")
    engine = make_engine(tmp_path, model=model)
    hook = Interrupt(model, at=10)  # chunks of 16, pages of 64: pages 0 and 1 complete, chunk 10 half done
    with pytest.raises(KeyboardInterrupt):
        engine.prefill(PROMPT, progress=False)
    hook.handle.remove()
    assert [p.name[:7] for p in pages(tmp_path)] == ["p000000", "p000001"] and not temp_files(tmp_path)
    verify_all(tmp_path)
    (seg,) = engine._prefix.memory._segments
    assert len(seg.keys) == 2 and [seg.store.length(i) for i in range(2)] == [2 * PAGE, 2 * PAGE]
    res = engine.generate(PROMPT, max_new_tokens=4)
    assert res.cached_tokens == 2 * PAGE and res.token_ids == cold_ids
    assert make_engine(tmp_path, model=model).prefill(PROMPT, progress=False).cached_tokens == 5 * PAGE


def test_ctrl_c_while_pages_load_keeps_the_engine_consistent(tmp_path, cold_ids, monkeypatch):
    model = tiny_model("llama")
    make_engine(tmp_path, model=model).generate(PROMPT, max_new_tokens=4)
    engine = make_engine(tmp_path, model=model)
    real, calls = ResidentStore.extend, {"n": 0}

    def extend(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 2:  # third page, second layer (2 layers per page)
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ResidentStore, "extend", extend)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPT, max_new_tokens=4)
    monkeypatch.setattr(ResidentStore, "extend", real)
    (seg,) = engine._prefix.memory._segments
    assert len(seg.keys) == 2 and [seg.store.length(i) for i in range(2)] == [2 * PAGE, 2 * PAGE]
    res = engine.generate(PROMPT, max_new_tokens=4)
    assert res.cached_tokens == 5 * PAGE and res.token_ids == cold_ids  # 2 pages from memory, 3 from disk
    verify_all(tmp_path)


@pytest.mark.parametrize("failure", ["disk full", "ctrl-c"])
def test_a_failed_page_write_leaves_nothing_behind(tmp_path, cold_ids, monkeypatch, caplog, failure):
    real = page_file.write_page_file

    def broken(fh, keys, values, meta):
        real(fh, keys, values, meta)
        fh.truncate(fh.tell() // 2)
        if failure == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    monkeypatch.setattr(disk, "write_page_file", broken)
    caplog.set_level(logging.WARNING, logger="reattention")
    model = tiny_model("llama")
    engine = make_engine(tmp_path, model=model)
    if failure == "disk full":
        res = engine.generate(PROMPT, max_new_tokens=4)
        assert res.token_ids == cold_ids and "the disk is full" in caplog.text
    else:
        with pytest.raises(KeyboardInterrupt):
            engine.generate(PROMPT, max_new_tokens=4)
    assert not pages(tmp_path) and not temp_files(tmp_path)
    monkeypatch.setattr(disk, "write_page_file", real)
    assert engine.generate(PROMPT, max_new_tokens=4).token_ids == cold_ids
    assert make_engine(tmp_path, model=model).generate(PROMPT, max_new_tokens=4).token_ids == cold_ids


def test_stale_temporary_files_are_ignored_and_swept(tmp_path):
    """A temporary file nobody holds a lock on is a killed writer's leftover, however young; one whose
    writer still holds its lock stays (the kill -9 trials of tests/faults exercise this for real)."""
    engine = make_engine(tmp_path)
    engine.generate(PROMPT, max_new_tokens=1)
    ns = pages(tmp_path)[0].parent
    stale = ns / ".tmp-deadbeef-1-0000.safetensors"
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    left = ns / ".tmp-beef-3-0000.safetensors"
    left.write_bytes(b"a writer killed a moment ago")
    held = ns / ".tmp-cafe-2-0000.safetensors"
    with create_temporary(held) as writing:
        writing.write(b"being written")
        writing.flush()
        engine._prefix.disk.evict()
        assert not stale.exists() and not left.exists() and held.exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("REATTENTION_CACHE_DIR", str(tmp_path / "x"))
    assert directory.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("REATTENTION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert directory.default_cache_dir() == tmp_path / "xdg" / "reattention"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert directory.default_cache_dir() == Path.home() / ".cache" / "reattention"
    assert (
        directory.parse_bytes("64G") == 64 << 30
        and directory.parse_bytes("512MiB") == 512 << 20
        and directory.parse_bytes(10) == 10
    )
    monkeypatch.setenv("REATTENTION_CACHE_MAX_BYTES", "2G")
    assert CacheConfig().resolved_disk_bytes() == 2 << 30


def test_clear_cache_removes_this_fingerprint_only(tmp_path):
    a = make_engine(tmp_path)
    b = make_engine(tmp_path, config=CFG.replace(top_k=3))
    a.generate(PROMPT, max_new_tokens=1)
    b.generate(PROMPT, max_new_tokens=1)
    assert len(pages(tmp_path)) == 10
    a.clear_cache()
    assert len(pages(tmp_path)) == 5 and a.cache_info().disk.pages == 0 and b.cache_info().disk.pages == 5
    assert a.generate(PROMPT, max_new_tokens=1).cached_tokens == 0
    b.clear_cache(all_models=True)
    assert not pages(tmp_path)


def test_a_corpus_tail_page_is_reused_from_disk_and_verified(tmp_path, caplog):
    model = tiny_model("llama")
    corpus = word_text(5 * PAGE + 20, seed=3)
    cold = ReAttentionEngine(model, ByteTokenizer(), CFG, cache=False)
    first = make_engine(tmp_path, model=model)
    b = len(first.prompts.context_prefix_ids(corpus))
    assert b // PAGE == 5 and b % PAGE
    assert first.generate("what now?", context=corpus, max_new_tokens=4).cached_tokens == 0
    files = pages(tmp_path)
    assert len(files) == 6 and files[-1].name.startswith("p000005-")
    assert page_file.read_header(files[-1])["__metadata__"]["tokens"] == str(b - 5 * PAGE)
    verify_all(tmp_path)
    fresh = make_engine(tmp_path, model=model)  # nothing in memory: all of it from disk
    assert fresh.cache_info().disk.tokens == b
    res = fresh.generate("and then?", context=corpus, max_new_tokens=4)
    assert res.cached_tokens == b
    assert res.token_ids == cold.generate("and then?", context=corpus, max_new_tokens=4).token_ids
    _corrupt(files[-1], "truncated")
    caplog.set_level(logging.WARNING, logger="reattention")
    again = make_engine(tmp_path, model=model).generate("and then?", context=corpus, max_new_tokens=4)
    assert again.cached_tokens == 5 * PAGE and again.token_ids == res.token_ids
    assert f"dropping {files[-1]}" in caplog.text
