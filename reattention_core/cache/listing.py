"""List and remove what the disk prefix cache holds, per engine fingerprint, without loading a model.

Backs ``reattention cache ls|rm``. It reads the layout `reattention_core.cache.disk` writes (one
folder per fingerprint, a ``manifest.json`` naming the model and settings, one safetensors page
per file with its token count and parent key in the header) and removes through
`CacheDirectory.clear`, so removal takes the same inter-process lock as the engines that write.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reattention_core.cache.directory import (
    MANIFEST,
    CacheDirectory,
    default_cache_dir,
    default_max_bytes,
    namespace_folders,
)
from reattention_core.cache.fingerprint import EngineFingerprint
from reattention_core.cache.page_file import PAGE_SUFFIX, page_metadata, page_name_parts
from reattention_core.errors import CacheError
from reattention_core.safe_files import read_json

UNKNOWN_MODEL = "(no manifest)"


@dataclass(frozen=True)
class CacheNamespace:
    """The pages of one engine fingerprint (model, tokenizer, config, dtype, device, backend, page size).

    Attributes:
        namespace: the folder name (first 32 hex digits of the fingerprint root).
        model_name: the model's display name from the manifest (`UNKNOWN_MODEL` without one).
        settings: a few readable settings from the manifest: mode, dtype, device, page size.
        entries: cached prefixes (chains that no other page continues).
        pages, tokens, bytes: page files, the tokens they hold, their size on disk.
        last_used: newest page mtime (a page's mtime is its last use), seconds since the epoch.
    """

    namespace: str
    model_name: str
    settings: dict[str, str] = field(default_factory=dict)
    entries: int = 0
    pages: int = 0
    tokens: int = 0
    bytes: int = 0
    last_used: float = 0.0
    manifest: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def fingerprint(self) -> EngineFingerprint | None:
        """The fingerprint rebuilt from the manifest (``None`` if it is missing or inconsistent)."""
        if not self.manifest or not isinstance(self.manifest.get("components"), dict):
            return None
        fp = EngineFingerprint(components=self.manifest["components"], model_name=self.model_name)
        return fp if fp.namespace == self.namespace else None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = read_json(folder / MANIFEST)
        if isinstance(data, dict):
            return data
    return None


def _printable(text: str, limit: int = 200) -> str:
    """``text`` safe to print on a terminal: control characters (escape sequences) become ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _settings(manifest: dict[str, Any] | None) -> dict[str, str]:
    if not manifest:
        return {}
    comps = manifest.get("components")
    comps = comps if isinstance(comps, dict) else {}
    details = manifest.get("details")
    config = details.get("config") if isinstance(details, dict) else None
    config = config if isinstance(config, dict) else {}
    out = {"mode": _printable(str(config.get("mode", "?")))}
    for name in ("dtype", "device", "page_size"):
        if name in comps:
            out[name] = _printable(str(comps[name]))
    return out


def scan_namespace(folder: Path) -> CacheNamespace:
    """Count the pages, tokens, bytes and cached prefixes of one fingerprint folder."""
    manifest = _read_manifest(folder)
    keys: set[str] = set()
    parents: set[str] = set()
    tokens = size = 0
    newest = 0.0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if page_name_parts(entry.name) is None:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue  # a link in a page's place is never followed
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile by another process
            meta = page_metadata(Path(entry.path))
            keys.add(entry.name.removesuffix(PAGE_SUFFIX).split("-", 1)[-1])
            if isinstance(meta.get("parent"), str):
                parents.add(meta["parent"])
            with contextlib.suppress(KeyError, TypeError, ValueError):
                tokens += int(meta["tokens"])
            size += st.st_size
            newest = max(newest, st.st_mtime)
    return CacheNamespace(
        namespace=folder.name,
        model_name=_printable(str(manifest.get("model_name") or "?")) if manifest else UNKNOWN_MODEL,
        settings=_settings(manifest),
        entries=len(keys - parents),
        pages=len(keys),
        tokens=tokens,
        bytes=size,
        last_used=newest,
        manifest=manifest,
    )


def list_cache(directory: str | Path | None = None) -> list[CacheNamespace]:
    """Every fingerprint folder holding pages or a manifest, most recently used first."""
    root = Path(directory).expanduser() if directory is not None else default_cache_dir()
    if not root.is_dir():
        return []
    found = [scan_namespace(p) for p in namespace_folders(root)]
    found = [ns for ns in found if ns.pages or ns.manifest is not None]
    return sorted(found, key=lambda ns: (-ns.last_used, ns.namespace))


def matches(ns: CacheNamespace, model: str) -> bool:
    """Whether ``model`` names this folder: its model name (case-insensitive) or a namespace prefix."""
    wanted = model.strip().lower()
    return ns.model_name.lower() == wanted or (len(wanted) >= 4 and ns.namespace.startswith(wanted))


def remove_cache(directory: str | Path | None = None, model: str | None = None) -> list[CacheNamespace]:
    """Delete every page (``model=None``) or the pages of one model; returns what was removed.

    ``model`` is a model name as `list_cache` shows it, or the first 4+ characters of a namespace.

    Raises:
        CacheError: ``model`` names nothing in the cache (the message lists what is there).
    """
    root = Path(directory).expanduser() if directory is not None else default_cache_dir()
    present = list_cache(root)
    disk = CacheDirectory(root, default_max_bytes())
    if model is None:
        disk.clear(None)
        return present
    chosen = [ns for ns in present if matches(ns, model)]
    if not chosen:
        names = sorted({ns.model_name for ns in present}) or ["nothing"]
        raise CacheError(
            f"no cached pages for {model!r} in {root}; it holds: {', '.join(names)}. "
            "Pass a model name as `reattention cache ls` shows it, or a namespace prefix"
        )
    for ns in chosen:
        fp = ns.fingerprint()
        if fp is None:
            raise CacheError(
                f"{root / ns.namespace} has no readable manifest, so it cannot be removed by model; "
                "use `reattention cache rm --all`"
            )
        disk.clear(fp)
    return chosen


__all__ = ["UNKNOWN_MODEL", "CacheNamespace", "list_cache", "matches", "remove_cache", "scan_namespace"]
