"""Converted GGUF checkpoints on disk, so that a GGUF file is parsed and de-quantized once, not at every load.

The first load writes the de-quantized weights (the very tensors the GGUF load gave, so logits and the
prefix-cache fingerprint are unchanged), config and tokenizer to a folder; later loads read it.
Where: `model_cache_dir`; what identifies a conversion: `ConversionSource`; how it is written: `save`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

from reattention_core.hf.architectures import model_config
from reattention_core.safe_files import is_regular, read_json

log = logging.getLogger("reattention")

ENV_DIR = "REATTENTION_MODEL_CACHE"
_OFF = {"off", "0", "false", "no", "none"}
MANIFEST = "reattention-conversion.json"
WEIGHTS = "model.safetensors"
TMP_PREFIX = ".tmp-"
# Temporary folders older than this are leftovers of a killed process.
STALE_TMP_S = 3600.0
_HEAD_BYTES = 1 << 20
# Config entries that describe the GGUF quantization: the converted weights are plain tensors.
_DROP_CONFIG_KEYS = ("quantization_config",)


def model_cache_dir() -> Path | None:
    """The conversion cache's folder, or ``None`` when ``REATTENTION_MODEL_CACHE=off``.

    ``$REATTENTION_MODEL_CACHE``, else ``$XDG_CACHE_HOME/reattention-models``, else
    ``~/.cache/reattention-models``.
    """
    env = os.environ.get(ENV_DIR)
    if env is not None and env.strip().lower() in _OFF:
        return None
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "reattention-models"


@dataclass(frozen=True)
class ConversionSource:
    """What identifies one conversion: the GGUF file as it is now, the dtype, the transformers version.

    The key covers the file's resolved path, size, mtime and first MiB, so an edited file or another
    transformers release converts afresh (replacing the old conversion).
    """

    path: str
    size: int
    mtime_ns: int
    head_sha256: str
    dtype: str
    transformers: str

    @classmethod
    def of(cls, gguf: Path, dtype: torch.dtype) -> ConversionSource:
        import transformers

        gguf = gguf.resolve()
        st = gguf.stat()
        with gguf.open("rb") as fh:
            head = hashlib.sha256(fh.read(_HEAD_BYTES)).hexdigest()
        return cls(
            str(gguf), st.st_size, st.st_mtime_ns, head, str(dtype).removeprefix("torch."), transformers.__version__
        )

    @property
    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{Path(self.path).stem[:48]}-{self.dtype}-{hashlib.sha256(blob).hexdigest()[:16]}"


def find(gguf: Path, dtype: torch.dtype) -> Path | None:
    """Folder of a complete conversion of ``gguf`` at ``dtype``, or ``None`` (none yet, or the cache is off)."""
    root = model_cache_dir()
    if root is None:
        return None
    try:
        source = ConversionSource.of(gguf, dtype)
    except OSError:
        return None
    folder = root / source.key
    return folder if _complete(folder, source) else None


def _manifest(folder: Path) -> dict | None:
    """A conversion folder's manifest (``source`` and ``files``, both dicts), or ``None`` if it has none.

    A folder that is a symbolic link, or a manifest naming anything but plain file names in its
    own folder (``../x``, ``/etc/x``) with integer sizes, is not a conversion: never followed.
    """
    if folder.is_symlink():
        return None
    try:
        manifest = read_json(folder / MANIFEST)
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and all(isinstance(manifest.get(k), dict) for k in ("source", "files"))
    if not ok or not all(_plain_name(n) and type(v) is int and v >= 0 for n, v in manifest["files"].items()):
        return None
    return manifest


def _plain_name(name: object) -> bool:
    """Whether ``name`` names a file directly inside a folder (no separator, not ``.`` or ``..``)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name:
        return False
    return not any(sep and sep in name for sep in ("/", os.sep, os.altsep))


def _complete(folder: Path, source: ConversionSource) -> bool:
    """Whether ``folder`` holds a whole conversion of ``source``: its manifest, every file at its recorded size."""
    manifest = _manifest(folder)
    if manifest is None or manifest["source"] != asdict(source):
        return False
    try:
        return all(
            is_regular(folder / name) and (folder / name).stat().st_size == size
            for name, size in manifest["files"].items()
        )
    except (OSError, TypeError):
        return False


@dataclass(frozen=True)
class Conversion:
    """One complete conversion on disk (`list_conversions`)."""

    folder: Path
    source: str
    dtype: str
    transformers: str
    bytes: int


def _printable(text: str, limit: int = 500) -> str:
    """``text`` safe to print on a terminal: control characters (escape sequences) become ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def list_conversions() -> list[Conversion]:
    """Every complete conversion in the cache folder, by source path."""
    root = model_cache_dir()
    if root is None or not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        manifest = _manifest(entry)
        if manifest is None:
            continue  # a temporary or foreign folder
        src = manifest["source"]
        try:
            size = sum(int(n) for n in manifest["files"].values())
            path, dtype, version = (_printable(str(src[k])) for k in ("path", "dtype", "transformers"))
            found.append(Conversion(entry, path, dtype, version, size))
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(found, key=lambda c: (c.source, c.dtype, c.folder.name))


def remove_conversions() -> list[Conversion]:
    """Delete every conversion (the next load of each GGUF file converts it again); returns what was removed."""
    found = list_conversions()
    for conv in found:
        discard(conv.folder)
    return found


def discard(folder: Path) -> None:
    """Remove one conversion (e.g. one that failed to load); a link in its place is removed, not followed."""
    if folder.is_symlink():
        with contextlib.suppress(OSError):
            folder.unlink()
        return
    with contextlib.suppress(OSError):
        (folder / MANIFEST).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def save(model: torch.nn.Module, tokenizer: Any, gguf: Path, dtype: torch.dtype) -> Path | None:
    """Write ``model`` and ``tokenizer``, just loaded from ``gguf`` at ``dtype``; returns the folder.

    Written under a temporary name and renamed into place, its manifest last, so a killed process never
    leaves a half conversion. Never raises for a cache that cannot be written: it logs a warning and
    returns ``None`` (the model loaded from the GGUF file is used as it is).
    """
    root = model_cache_dir()
    if root is None:
        return None
    tmp: Path | None = None
    try:
        source = ConversionSource.of(gguf, dtype)
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root, source)
        tmp = root / f"{TMP_PREFIX}{source.key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        _write(model, tokenizer, tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": asdict(source), "files": files}, indent=1))
        final = root / source.key
        if _complete(final, source):  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if final.exists():  # an incomplete or stale folder under the same key
            discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final, source):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process renamed its copy into place meanwhile
            return final
        log.info("converted %s (%s) for fast loading: %s", gguf.name, source.dtype, final)
        return final
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning(
            "could not keep a converted copy of %s in %s (%s); the next load will read the GGUF "
            "file again (set %s to a writable folder, or to 'off')",
            gguf.name,
            root,
            exc,
            ENV_DIR,
        )
        return None


def _write(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    from safetensors.torch import save_model

    # transformers refuses to `save_pretrained` a GGUF-loaded model (it counts as quantized), so the
    # pieces are written one by one: the weights are ordinary de-quantized tensors.
    model_config(model).save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in _DROP_CONFIG_KEYS:
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        cast(Any, model).generation_config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})  # tied weights are written once
    tokenizer.save_pretrained(folder)


def _sweep(root: Path, source: ConversionSource) -> None:
    """Drop stale temporary folders, and conversions of this GGUF path that its current contents replaced."""
    now = time.time()
    for entry in root.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            continue
        if entry.name.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(entry, ignore_errors=True)
            continue
        manifest = _manifest(entry)
        if manifest is None:
            continue
        old = manifest["source"]
        same_slot = (old.get("path"), old.get("dtype"), old.get("transformers")) == (
            source.path,
            source.dtype,
            source.transformers,
        )
        if same_slot and old != asdict(source):  # the GGUF file changed since that conversion
            discard(entry)
