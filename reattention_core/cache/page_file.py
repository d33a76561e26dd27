"""The page file of the disk cache: one safetensors file per page, verified on every read.

The format is `write_page_file`'s; the checks are `read_page`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from reattention_core.cache.fingerprint import FORMAT_VERSION
from reattention_core.errors import PageError, PageMissing
from reattention_core.safe_files import loads_json, open_regular

PAGE_SUFFIX = ".safetensors"
_PAGE_NAME = re.compile(r"p(\d{6,})-([0-9a-f]{64})\.safetensors")
# Largest safetensors header accepted, and the bytes read at first hoping to cover it.
_MAX_HEADER = 100 << 20
_HEADER_GUESS = 64 << 10


def page_file_name(index: int, key: str) -> str:
    return f"p{index:06d}-{key}{PAGE_SUFFIX}"


def page_name_parts(name: str) -> tuple[int, str] | None:
    """``(index, key)`` of a page file name, or ``None`` for any other name."""
    m = _PAGE_NAME.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


@dataclass(frozen=True)
class PageRef:
    """Where one page of a prompt's chain lives and what it must contain."""

    path: Path
    key: str
    parent: str
    index: int
    tokens: int  # tokens it holds: the page size, or fewer for a corpus's tail page


def read_header(path: Path) -> dict[str, Any]:
    """A page file's safetensors header (`ValueError` if unreadable; `OSError` for a link or non-file)."""
    with os.fdopen(open_regular(path), "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER:
            raise ValueError("header too large")
        header = loads_json(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")  # noqa: TRY004 - a parse error, as json.loads raises
    return header


def page_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a page file's header, or ``{}`` if it cannot be read (nothing is followed)."""
    try:
        meta = read_header(path).get("__metadata__")
    except (OSError, ValueError, struct.error):
        return {}
    return meta if isinstance(meta, dict) else {}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _parse_header(raw: bytes, size: int, path: str) -> tuple[dict[str, Any], int]:
    """The safetensors header of a ``size``-byte page file from its first bytes ``raw``.

    Returns the parsed header and the offset of the data section.
    """
    if size < 8 or len(raw) < 8:
        raise PageError(f"truncated ({size} bytes)", path)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(size - 8, _MAX_HEADER):
        raise PageError(f"header length {n} does not fit a {size}-byte file", path)
    if len(raw) < 8 + n:
        raise PageError(f"truncated header ({len(raw) - 8} of {n} bytes)", path)
    if (8 + n) % 8:  # the writer pads the header so that the data section is aligned for any dtype
        raise PageError(f"header length {n} leaves the data section unaligned", path)
    try:
        header = loads_json(raw[8 : 8 + n])
    except ValueError as exc:
        raise PageError(f"unreadable header ({exc})", path) from exc
    if not isinstance(header, dict):
        raise PageError("unreadable header (not an object)", path)
    return header, 8 + n


def _map_page(path: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Memory-map a page file: its parsed safetensors header and its data section as uint8.

    The mapping is private (copy-on-write), so the tensors are writable views that can never
    change the file; pages are read from the page cache or the device as they are touched.
    """
    import mmap

    with os.fdopen(open_regular(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise PageError(f"truncated ({size} bytes)", path)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    (n,) = struct.unpack("<Q", mm[:8])
    header, offset = _parse_header(mm[: 8 + min(n, _MAX_HEADER)], size, path)
    data = torch.frombuffer(mm, dtype=torch.uint8, offset=offset)
    with contextlib.suppress(AttributeError, OSError):  # hint: the whole file is about to be read
        mm.madvise(mmap.MADV_WILLNEED)
    return header, data


def _staging_buffer(nbytes: int) -> torch.Tensor | None:
    """A pinned uint8 host buffer of ``nbytes`` (from PyTorch's caching host allocator), or ``None``."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:  # no CUDA, or no pinned memory to be had
        return None


def _read_page_pinned(path: str) -> tuple[dict[str, Any], torch.Tensor] | None:
    """Read a page file's data section straight into a pinned host buffer (for a GPU store).

    One ``readinto`` per file instead of mapping it and copying the mapping into pinned memory:
    that halves the host memory traffic and avoids a page fault per 4 KiB. Returns ``None`` when
    no pinned memory can be had (the caller maps the file instead).
    """
    with os.fdopen(open_regular(path), "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(min(size, 8 + _HEADER_GUESS))
        if len(head) >= 8:
            (n,) = struct.unpack("<Q", head[:8])
            if len(head) < 8 + n <= min(size, 8 + _MAX_HEADER):  # a large header: read the rest of it
                head += fh.read(8 + n - len(head))
        header, offset = _parse_header(head, size, path)
        data = _staging_buffer(size - offset)
        if data is None:
            return None
        view = data.numpy().data
        view[: len(head) - offset] = head[offset:]
        done = len(head) - offset
        while done < len(view):  # regular files rarely return short reads, but they may
            got = fh.readinto(view[done:])
            if not got:
                raise PageError(f"truncated while reading ({offset + done} of {size} bytes)", path)
            done += got
    return header, data


def read_page(
    ref: PageRef,
    root: str,
    num_layers: int,
    dtype: torch.dtype,
    pin: bool = False,
    kv_shape: tuple[int, int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Open, check and checksum one page (runs on the loader's thread pool).

    Checks that the header parses, covers the file exactly, names the expected fingerprint root, key,
    parent and index, and places every tensor with the expected dtype and shape, and that the data
    section has the recorded CRC-32 (one zlib call per page, so loader threads hardly contend for the
    GIL). Files are mapped privately, or (``pin``) read into pinned staging buffers with one
    ``readinto``; a link in a page's place is never followed.

    ``kv_shape``: the ``(H, D)`` every tensor must have (``None``: any, as long as all agree).

    Returns views of the memory-mapped file, or (``pin=True``) of one pinned host buffer that the
    data section was read into, ready for asynchronous copies to a GPU.
    """
    path = str(ref.path)
    try:
        opened = _read_page_pinned(path) if pin else None
        header, data = opened if opened is not None else _map_page(path)
    except FileNotFoundError as exc:
        raise PageMissing(path) from exc
    except (OSError, ValueError, struct.error) as exc:
        raise PageError(f"unreadable or truncated ({exc})", path) from exc
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise PageError("no metadata object in the header", path)
    expected = {f"{kind}.{i}" for kind in "kv" for i in range(num_layers)}
    if set(header) != expected:
        raise PageError(f"holds tensors {sorted(header)[:4]}..., expected k.0..k.{num_layers - 1}, v.*", path)
    checks = {
        "format": str(FORMAT_VERSION),
        "fingerprint": root,
        "key": ref.key,
        "parent": ref.parent,
        "index": str(ref.index),
        "tokens": str(ref.tokens),
    }
    for name, want in checks.items():
        if meta.get(name) != want:
            raise PageError(f"metadata {name}={meta.get(name)!r}, expected {want!r}", path)
    try:
        crc = int(meta["crc32"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PageError("no readable checksum", path) from exc
    # Layout checks before touching the data: dtype, shape, and the extents of `_page_layout`.
    shape = (ref.tokens, *_page_shape(header, path)[1:])
    if kv_shape is not None and shape[1:] != tuple(kv_shape):
        raise PageError(f"tensors of {shape[1:]} (heads, head dim), this model has {tuple(kv_shape)}", path)
    layout = _page_layout(num_layers, shape, dtype)
    for name, (begin, stop) in layout.items():
        info = header[name]
        try:
            t_dtype, t_shape = _SAFETENSORS_DTYPES.get(info["dtype"]), tuple(int(x) for x in info["shape"])
            extent = tuple(int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise PageError(f"malformed entry for {name}", path) from exc
        if t_dtype != dtype:
            raise PageError(f"{name} has dtype {info['dtype']}, expected {dtype}", path)
        if t_shape != shape:
            raise PageError(f"{name} has shape {t_shape}, expected {shape}", path)
        if extent != (begin, stop):
            raise PageError(f"{name} lies at bytes {extent}, expected {(begin, stop)}", path)
    if stop != data.numel():
        raise PageError(f"the data section has {data.numel()} bytes, the header describes {stop}", path)
    # One checksum over the whole data section: one call that releases the GIL, where one per
    # tensor made the loader threads queue for the GIL.
    if zlib.crc32(data.numpy().data) != crc:
        raise PageError("checksum mismatch (corrupted file)", path)
    both = data.view(dtype).view(2, num_layers, *shape)
    return list(both[0].unbind(0)), list(both[1].unbind(0))


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _page_layout(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Byte extents of a page's tensors in its data section: ``k.0 .. k.{L-1}``, then ``v.0 ..``.

    A fixed, contiguous layout (a valid safetensors file, whatever order its header lists),
    so the data section is the bytes of one ``[2, L, T, H, D]`` tensor.
    """
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    names = [f"{kind}.{i}" for kind in "kv" for i in range(num_layers)]
    return {name: (j * nbytes, (j + 1) * nbytes) for j, name in enumerate(names)}


def _page_shape(header: dict[str, Any], path: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in header["k.0"]["shape"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise PageError("malformed entry for k.0", path) from exc
    if len(shape) != 3 or min(shape) < 1:
        raise PageError(f"k.0 has shape {shape}", path)
    return shape


def write_page_file(
    fh: BinaryIO, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], meta: dict[str, str]
) -> None:
    """Write one page (safetensors, `_page_layout`) with its token count and data CRC-32 in ``meta`` to ``fh``.

    The tensors (``[T, H, D]`` each, any device) are stacked where they live and copied to the
    host in one transfer; the file is written and fsync'ed (the caller renames it into place).

    Format: tensors ``k.0 .. k.{L-1}, v.0 .. v.{L-1}`` (pre-RoPE; ``T`` is the page size, or less for
    a corpus's tail page) back to back, so the data section is one ``[2, L, T, H, D]`` tensor; the
    metadata holds the format version, fingerprint root, key, parent key, chain index, token count and
    the data's CRC-32. Files are named ``p<6 digits>-<64 hex>.safetensors`` (`page_file_name`).
    """
    tensors = [t.detach() for t in (*keys, *values)]
    if len({t.device for t in tensors}) > 1:  # e.g. keys on the GPU, values in host memory (offload)
        tensors = [t.to("cpu") for t in tensors]
    both = torch.stack(tensors).to("cpu").contiguous()
    dtype, shape = both.dtype, tuple(both.shape[1:])
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"pages of dtype {dtype} are not supported (use float32, float16 or bfloat16)")
    data = both.view(torch.uint8).reshape(-1).numpy().data
    header: dict[str, Any] = {
        name: {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": list(extent)}
        for name, extent in _page_layout(len(keys), shape, dtype).items()
    }
    header["__metadata__"] = {**meta, "tokens": str(shape[0]), "crc32": str(zlib.crc32(data))}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data section starts 8-byte aligned, as safetensors does
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())
