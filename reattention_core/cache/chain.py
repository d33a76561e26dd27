"""The hash chain that names pages: page ``i``'s key is ``sha256(key[i-1] || its token ids)``.

The chain's root is the engine fingerprint's root, so a page's key names its whole prefix and
everything that shaped its keys and values. A corpus that ends inside a page (a ``context=``
prompt) ends its chain with a shorter *tail page* keyed with a domain tag, never equal to a whole
page's key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

# Domain tag of tail pages (shorter than a page, ending at a corpus boundary) in the hash chain.
_TAIL_TAG = b"reattention-tail-page"


def cacheable_pages(num_tokens: int, page_size: int) -> int:
    """Pages of a prompt that end at or before its last token (which always runs alone)."""
    return max(0, (num_tokens - 1) // page_size)


def page_keys(
    root: str, ids: Sequence[int], page_size: int, num_pages: int, *, tail_end: int | None = None
) -> list[str]:
    """Hash-chain keys of the first ``num_pages`` pages of ``ids`` (see the module doc).

    ``tail_end``: also the key of the tail page ``[num_pages * page_size, tail_end)`` (a corpus
    boundary inside the next page); nothing is added when that range is empty.
    """
    arr = np.asarray(ids[: max(num_pages * page_size, tail_end or 0)], dtype="<i8")
    prev = bytes.fromhex(root)
    keys = []
    for i in range(num_pages):
        prev = hashlib.sha256(prev + arr[i * page_size : (i + 1) * page_size].tobytes()).digest()
        keys.append(prev.hex())
    if tail_end is not None and tail_end > num_pages * page_size:
        if tail_end >= (num_pages + 1) * page_size:
            raise ValueError(f"tail_end={tail_end} is not inside page {num_pages} of {page_size} tokens")
        keys.append(hashlib.sha256(prev + _TAIL_TAG + arr[num_pages * page_size : tail_end].tobytes()).hexdigest())
    return keys


def chain_ends(num_keys: int, page_size: int, tail_end: int | None = None) -> list[int]:
    """End offset (in tokens) of each page of a chain of ``num_keys`` keys from `page_keys`."""
    ends = [(i + 1) * page_size for i in range(num_keys)]
    if ends and tail_end is not None and tail_end < ends[-1]:
        ends[-1] = tail_end
    return ends
