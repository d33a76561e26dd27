"""Files and keys that are not what they claim: crafted pages, links, FIFOs, manifests naming paths
outside the cache, a cache folder full of the user's own files; no unpickling; the API key."""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import stat
import struct
import threading
import zlib
from pathlib import Path

import pytest
import torch

from reattention_core import model_cache
from reattention_core.app.cli import main as cli_main
from reattention_core.cache import page_file
from reattention_core.cache.listing import list_cache, remove_cache
from reattention_core.errors import PageError
from tests.faults.common import PAGE, corpus, page_files, tiny_engine

ROOT = Path(__file__).resolve().parents[2]
PROMPT = corpus(5 * PAGE + 9, seed=5)  # 5 cacheable pages
KV_SHAPE = (2, 16)  # the tiny Llama's KV heads and head dim


@pytest.fixture(scope="module")
def cold() -> tuple[int, ...]:
    return tiny_engine(None, cache=False).generate(PROMPT, max_new_tokens=4, progress=False).token_ids


def _answer(folder: Path):
    return tiny_engine(folder).generate(PROMPT, max_new_tokens=4, progress=False)


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict | list | str, data: bytes, *, aligned: bool = True) -> bytes:
    raw = header.encode() if isinstance(header, str) else json.dumps(header, separators=(",", ":")).encode()
    if aligned:
        raw += b" " * (-(8 + len(raw)) % 8)
    elif (8 + len(raw)) % 8 == 0:
        raw += b" "
    return struct.pack("<Q", len(raw)) + raw + data


def _with(header: dict, name: str, **fields) -> dict:
    out = json.loads(json.dumps(header))
    out[name].update(fields)
    return out


def _craft(raw: bytes, how: str) -> bytes:
    header, data = _split(raw)
    size = len(data) // 4  # bytes of one tensor (2 layers, k and v)
    if how == "header length 2**64-1":
        return struct.pack("<Q", 2**64 - 1) + raw[8:]
    if how == "header length past the end":
        return struct.pack("<Q", len(raw)) + raw[8:]
    if how == "unaligned data section":
        return _join(header, data, aligned=False)
    if how == "overlapping offsets":  # the same bytes twice: the CRC still matches
        return _join(_with(header, "k.1", data_offsets=[0, size]), data)
    if how == "offsets past the end":
        return _join(_with(header, "v.1", data_offsets=[3 * size, 40 * size]), data)
    if how == "negative offsets":
        return _join(_with(header, "k.0", data_offsets=[-size, 0]), data)
    if how == "infinite shape":
        return _join(_with(header, "k.1", shape=[float("inf"), 2, 16]), data)
    if how == "metadata not an object":
        return _join({**header, "__metadata__": ["format", "2"]}, data)
    if how == "header nested 100000 deep":
        return _join('{"k.0":' + "[" * 100_000 + "]" * 100_000 + "}", data)
    if how == "header is a list":
        return _join([1, 2, 3], data)
    if how == "zero heads, no data":  # consistent in itself: layout, size and CRC all agree
        empty = {k: {**v, "shape": [PAGE, 0, 16], "data_offsets": [0, 0]} for k, v in header.items() if k[0] in "kv"}
        return _join({**empty, "__metadata__": {**header["__metadata__"], "crc32": str(zlib.crc32(b""))}}, b"")
    if how == "heads and head dim reshaped":  # the same bytes as [T, 1, 32]: layout and CRC agree
        return _join({k: ({**v, "shape": [PAGE, 1, 32]} if k[0] in "kv" else v) for k, v in header.items()}, data)
    if how == "dtype relabelled":
        return _join(_with(header, "k.0", dtype="F16"), data)
    raise AssertionError(how)


CRAFTS = [
    "header length 2**64-1",
    "header length past the end",
    "unaligned data section",
    "overlapping offsets",
    "offsets past the end",
    "negative offsets",
    "infinite shape",
    "metadata not an object",
    "header nested 100000 deep",
    "header is a list",
    "zero heads, no data",
    "heads and head dim reshaped",
    "dtype relabelled",
]


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("genuine")
    tiny_engine(folder).generate(PROMPT, max_new_tokens=1, progress=False)
    assert len(page_files(folder)) == 5
    return folder


def _copy(src: Path, dst: Path) -> Path:
    for path in src.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


def _ref(path: Path) -> page_file.PageRef:
    meta = page_file.read_header(path)["__metadata__"]
    return page_file.PageRef(path, meta["key"], meta["parent"], int(meta["index"]), int(meta["tokens"]))


@pytest.mark.parametrize("how", CRAFTS)
def test_a_crafted_page_is_rejected_and_recomputed(tmp_path, genuine, cold, caplog, monkeypatch, how):
    folder = _copy(genuine, tmp_path / "cache")
    victim = page_files(folder)[1]
    original = victim.read_bytes()
    ref, root = _ref(victim), page_file.read_header(victim)["__metadata__"]["fingerprint"]
    victim.write_bytes(_craft(original, how))
    monkeypatch.setattr(
        page_file, "_staging_buffer", lambda n: torch.empty(n, dtype=torch.uint8)
    )  # the GPU reader on CPU
    for pin in (False, True):
        with pytest.raises(PageError):
            page_file.read_page(ref, root, 2, torch.float32, pin=pin, kv_shape=KV_SHAPE)
    caplog.set_level(logging.WARNING, logger="reattention")
    res = _answer(folder)
    assert res.token_ids == cold and res.cached_tokens == PAGE  # page 0 reused, the crafted one not
    assert f"dropping {victim}" in caplog.text
    assert victim.read_bytes() == original  # recomputed and written whole


def test_the_genuine_pages_pass_the_same_checks(genuine):
    for path in page_files(genuine):
        keys, _values = page_file.read_page(
            _ref(path), page_file.read_header(path)["__metadata__"]["fingerprint"], 2, torch.float32, kv_shape=KV_SHAPE
        )
        assert keys[0].shape == (PAGE, *KV_SHAPE)


def test_a_link_swapped_in_for_a_page_is_never_followed(tmp_path, genuine, cold, caplog):
    """The link points at a valid copy of the page itself: reading it would even give the right data.
    It is dropped unread, and the file it points to is neither changed nor touched."""
    folder = _copy(genuine, tmp_path / "cache")
    victim = page_files(folder)[1]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(victim.read_bytes())
    os.utime(outside, ns=(10**18, 10**18))
    victim.unlink()
    victim.symlink_to(outside)
    caplog.set_level(logging.WARNING, logger="reattention")
    res = _answer(folder)
    assert res.token_ids == cold and res.cached_tokens == PAGE
    assert "symbolic link (not followed)" in caplog.text
    assert not victim.is_symlink() and victim.read_bytes() == outside.read_bytes()
    assert outside.stat().st_mtime_ns == 10**18  # not touched through the link either
    assert [ns.pages for ns in list_cache(folder)] == [5]


def test_fifos_in_a_cache_folder_never_block_a_reader(tmp_path, genuine, cold):
    folder = _copy(genuine, tmp_path / "cache")
    other = folder / ("f" * 32)
    other.mkdir()
    os.mkfifo(other / "manifest.json")  # read when a miss is explained: an open for reading would block
    victim = page_files(folder)[2]
    victim.unlink()
    os.mkfifo(victim)
    out: dict = {}
    # engines built here: `tiny_model` seeds torch's global generator, so threads must not build them
    answering, missing = tiny_engine(folder), tiny_engine(folder, page_size=32)

    def answer() -> None:
        out["res"] = answering.generate(PROMPT, max_new_tokens=4, progress=False)
        out["ls"] = cli_main(["cache", "ls", "--dir", str(folder)])

    def miss() -> None:
        out["miss"] = missing.generate(PROMPT, max_new_tokens=1, progress=False)

    worker, miss = threading.Thread(target=answer, daemon=True), threading.Thread(target=miss, daemon=True)
    worker.start()
    miss.start()
    worker.join(60)
    miss.join(60)
    assert not worker.is_alive() and not miss.is_alive(), "a reader blocked on a FIFO"
    assert out["res"].token_ids == cold and out["res"].cached_tokens == 2 * PAGE and out["ls"] == 0
    assert out["miss"].cached_tokens == 0  # another page size: a miss, explained by reading the manifests
    assert stat.S_ISREG(victim.lstat().st_mode)  # replaced by the recomputed page


def _users_files(base: Path) -> dict[Path, bytes]:
    """Files of the user's that happen to share names with the cache's: nothing may delete them."""
    files = {
        base / "models" / "pytorch_model.safetensors": b"weights",
        base / "notes" / "manifest.json": b'{"mine": true}',
        base / "p000000-notes.safetensors": b"not a page",
        base / ("e" * 32) / "p000001-keep.safetensors": b"not a page either",
        base / ("e" * 32) / "todo.txt": b"buy milk",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_eviction_and_removal_touch_only_the_caches_own_files(tmp_path, genuine, monkeypatch, capsys):
    """A cache folder shared with the user's files, and a namespace-named link to a folder outside it:
    eviction under a tiny cap, `clear_cache(all_models=True)` and `reattention cache rm --all` delete
    every page and nothing else."""
    folder = _copy(genuine, tmp_path / "cache")
    mine = _users_files(folder)
    outside = tmp_path / "elsewhere"
    theirs = _users_files(outside)
    for i in range(3):
        (outside / f"p{i:06d}-{'a' * 64}.safetensors").write_bytes(b"named like a page, outside the cache")
    theirs.update({p: p.read_bytes() for p in outside.glob("p0*.safetensors")})
    (folder / ("d" * 32)).symlink_to(outside, target_is_directory=True)
    page = page_files(folder)[0].stat().st_size
    engine = tiny_engine(folder, disk_bytes=3 * page)  # the next prompt's pages evict the others
    engine.generate(corpus(4 * PAGE + 3, seed=6), max_new_tokens=1, progress=False)
    assert len(page_files(folder)) <= 3
    engine.clear_cache(all_models=True)
    tiny_engine(folder).generate(PROMPT, max_new_tokens=1, progress=False)
    assert cli_main(["cache", "rm", "--all", "--dir", str(folder)]) == 0
    assert remove_cache(folder) == [] and not page_files(folder)
    for path, data in {**mine, **theirs}.items():
        assert path.read_bytes() == data, f"{path} was changed or deleted"
    assert (folder / ("d" * 32)).is_symlink()


def test_the_cache_folder_is_created_private(tmp_path):
    old = os.umask(0o022)
    try:
        folder = tmp_path / "new" / "cache"
        tiny_engine(folder).generate(PROMPT, max_new_tokens=1, progress=False)
    finally:
        os.umask(old)
    ns = page_files(folder)[0].parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(ns.stat().st_mode) == 0o700
    for path in [*ns.iterdir(), folder / ".lock"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    tiny_engine(shared).generate(PROMPT, max_new_tokens=1, progress=False)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # a folder the user made keeps its permissions


def test_hostile_manifests_do_not_break_cache_ls(tmp_path, genuine, capsys):
    folder = _copy(genuine, tmp_path / "cache")
    deep, odd, escape = (folder / (c * 32) for c in "abc")
    for ns in (deep, odd, escape):
        ns.mkdir()
    (deep / "manifest.json").write_text('{"components":' + "[" * 100_000 + "]" * 100_000 + "}")
    (odd / "manifest.json").write_text('{"components": [1], "details": "x", "model_name": 5}')
    (escape / "manifest.json").write_text(json.dumps({"model_name": "evil\x1b]0;owned\x07\x1b[2J", "details": []}))
    assert cli_main(["cache", "ls", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "evil" in out
    assert cli_main(["cache", "rm", "evil?]0;owned??[2J", "--dir", str(folder)]) == 2  # no usable manifest: refused


def _conversion(root: Path, gguf: Path, files: dict[str, int]) -> Path:
    from dataclasses import asdict

    source = model_cache.ConversionSource.of(gguf, torch.float32)
    folder = root / source.key
    folder.mkdir(parents=True)
    (folder / model_cache.MANIFEST).write_text(json.dumps({"source": asdict(source), "files": files}))
    return folder


def test_a_conversion_manifest_naming_paths_outside_its_folder_is_not_followed(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv(model_cache.ENV_DIR, str(root))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"12345")
    for name in ("../secret.bin", str(secret)):
        folder = _conversion(root, gguf, {name: 5})
        assert model_cache.find(gguf, torch.float32) is None  # a manifest naming that is no conversion
        assert model_cache.list_conversions() == []
        model_cache.discard(folder)
    outside = tmp_path / "outside-conversion"
    _conversion(tmp_path / "staging", gguf, {"w.bin": 1}).rename(outside)
    (outside / "w.bin").write_bytes(b"x")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    assert model_cache.list_conversions() == [] and model_cache.remove_conversions() == []
    assert (outside / model_cache.MANIFEST).is_file() and secret.read_bytes() == b"12345"


# -- no unpickling, anywhere in the package ---------------------------------------------------------

_UNPICKLING = [
    r"^\s*(import|from)\s+(c?[pP]ickle|_pickle|dill|cloudpickle|joblib|shelve|marshal)\b",
    r"\b(c?pickle|_pickle|dill|cloudpickle|joblib|marshal)\.(loads?|Unpickler)\b",
    r"\bUnpickler\b",
    r"\btorch\.load\s*\(",
    r"\ballow_pickle\s*=\s*True",
    r"\bread_pickle\b",
    r"\bshelve\.open\b",
    r"\b__import__\s*\(\s*['\"](c?pickle|dill|joblib|shelve|marshal)",
]


def _unpickling_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for p in _UNPICKLING)]


def test_nothing_in_the_package_unpickles():
    sources = [p for d in ("reattention_core", "kernels", "reattention_integrations") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 40
    found = {str(p.relative_to(ROOT)): hits for p in sources if (hits := _unpickling_lines(p.read_text()))}
    assert not found, f"code that can unpickle: {found}"
    # the patterns catch what they must (so the test above can fail)
    for bad in (
        "import pickle",
        "from joblib import load",
        "x = pickle.loads(b)",
        "torch.load(path)",
        "np.load(f, allow_pickle=True)",
        "pd.read_pickle(p)",
        "shelve.open(p)",
        "marshal.load(fh)",
    ):
        assert _unpickling_lines(bad), bad


# -- the API key -----------------------------------------------------------------------------------


def test_the_api_key_is_compared_in_time_independent_of_its_length(monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from reattention_core.app.serving.guards import key_matches
    from reattention_core.serving import AppConfig, create_app

    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    key = "s3cret-key-of-some-length"
    assert key_matches(f"Bearer {key}", key)
    for wrong in ("", "Bearer", f"Bearer {key}x", f"Bearer {key[:-1]}", "x" * 10_000, "Bearer é"):
        assert not key_matches(wrong, key)
    app = create_app(tiny_engine(None, cache=False), AppConfig(api_key=key))
    with TestClient(app) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer x"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert len(compared) == 9 and set(compared) == {(32, 32)}  # fixed-length digests, whatever was sent
