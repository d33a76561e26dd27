"""Host buffers of an offloaded store in memory-mapped files (``OffloadConfig(spill_dir=...)``).

Each buffer is backed by a new file, unlinked as soon as it is mapped (nothing is left behind, even
after a crash), whose disk space is reserved up front, so a full disk is a `StoreMemoryError` before
anything is written instead of a crash mid-generation.
"""

from __future__ import annotations

import errno
import os
import tempfile

import torch

from reattention_core.errors import StoreMemoryError


def _size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it at 1 or more (``"1.50 GiB"``, ``"135.3 KiB"``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{nbytes} bytes"


def spill_buffer(folder: str, which: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty host tensor backed by a new, already unlinked file in ``folder`` (disk space reserved)."""
    numel = torch.Size(shape).numel()
    nbytes = numel * dtype.itemsize
    fd, path = tempfile.mkstemp(prefix=f"reattention-{which}-", suffix=".kv", dir=folder)
    try:
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)  # a full disk fails here, not as SIGBUS on a later write
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # no fallocate on this filesystem
                os.ftruncate(fd, nbytes)
            else:
                raise StoreMemoryError(
                    f"the KV store could not reserve {_size(nbytes)} in {folder} for one layer's {which} "
                    f"({shape[1]:,} tokens): {exc.strerror or exc}. Free disk space there, choose another "
                    "spill_dir, or shorten the context."
                ) from exc
        flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)  # the mapping keeps the data; nothing is left behind on exit or crash
    return flat.view(shape)
