"""Files in the package's cache folders, opened so that a file that is not what it claims does no harm.

A cache folder may be shared with other processes, sync tools or a user's own files, so everything the
caches read, create or delete goes through here. Temporaries are created and swept under one
folder-wide lock (`create_temporary`, `abandoned`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

try:  # POSIX; elsewhere temporary files are judged by age alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | Path) -> int:
    """A read-only file descriptor of ``path``, which must be a regular file and not a symbolic link.

    Raises:
        FileNotFoundError: nothing is there.
        OSError: a symbolic link (``ELOOP``; not followed) or not a regular file (``EINVAL``).
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link (not followed)", str(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def loads_json(raw: bytes | str) -> Any:
    """`json.loads`, with nesting too deep for the parser reported as the `ValueError` it is."""
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def read_json(path: str | Path, limit: int = 1 << 20) -> Any:
    """The JSON value in the regular file ``path`` of at most ``limit`` bytes.

    Raises:
        OSError: missing, a symbolic link, not a regular file, unreadable.
        ValueError: larger than ``limit`` or not JSON.
    """
    with os.fdopen(open_regular(path), "rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return loads_json(raw)


def is_regular(path: str | Path) -> bool:
    """Whether ``path`` is a regular file itself (a symbolic link is not, whatever it points to)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) if needed; a folder created here is ``0700``.

    An existing folder keeps its permissions: a cache folder shared on purpose stays shared.
    """
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)


def create_temporary(path: Path) -> BinaryIO:
    """A new file ``path`` (``0600``, never an existing file or link), open for writing and flock'ed.

    The lock lasts until the file is closed; rename the file into place before closing it, so
    that no other process ever sees it complete and unlocked (`abandoned`). Call it under the
    lock that sweepers of the folder hold: the file exists unlocked for an instant after creation.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, PRIVATE_FILE)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def open_private(path: Path, mode: str = "a+b") -> BinaryIO:
    """Open (creating it ``0600`` if needed) a file that must not be a link, e.g. a lock file."""
    flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC
    return cast(BinaryIO, os.fdopen(os.open(path, flags, PRIVATE_FILE), mode))


def abandoned(path: str | Path, *, stale_s: float = 3600.0) -> bool:
    """Whether a temporary file of `create_temporary` was left behind by a writer that is gone.

    Call it under the folder-wide lock its writers take to create temporaries: every temporary
    then has its ``flock`` held by its writer until it is renamed, so one nobody holds has no
    writer any more (a killed process's locks are released by the kernel), whatever its age or
    size. A link or other non-file in a temporary file's place is nobody's: abandoned too.
    Without ``flock`` (non-POSIX) only files older than ``stale_s`` count.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return True
    if fcntl is None:
        return time.time() - st.st_mtime > stale_s
    try:  # write-only: the sweeper never reads a temporary file, it only asks who holds it
        fd = os.open(path, os.O_WRONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError:
        return False  # gone meanwhile, or not ours to judge
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its writer is alive
        return True
    finally:
        os.close(fd)


__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "abandoned",
    "create_temporary",
    "is_regular",
    "loads_json",
    "make_private_dir",
    "open_private",
    "open_regular",
    "read_json",
]
