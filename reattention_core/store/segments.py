"""`TokenSegments`: tensors joined along the token axis without copying them.

An offloaded store that adopts its prefix from mapped page files (`reattention_core.store.offloaded`)
reads one layer's keys through this instead of ``torch.cat``, which would copy the whole corpus.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


class TokenSegments:
    """A read-only ``[B, T, H, D]`` sequence made of ``parts`` (same ``B, H, D``, dtype, device) along dim 1.

    Supports what the offloaded attention reads: ``shape``, ``dtype``, ``device``, token ranges
    (``x[:, a:b]``, ``x[i, a:b]``; a copy when the range spans parts, a view otherwise),
    ``index_select(1, idx)``, `row` and `materialize`.
    """

    def __init__(self, parts: Sequence[torch.Tensor]) -> None:
        if not parts:
            raise ValueError("TokenSegments needs at least one part")
        first = parts[0]
        for p in parts:
            if p.dim() != 4 or p.shape[0] != first.shape[0] or p.shape[2:] != first.shape[2:]:
                raise ValueError(
                    f"parts must be [B, T_i, H, D] with one B, H, D; got {tuple(first.shape)} and {tuple(p.shape)}"
                )
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError("parts must share one dtype and one device")
        kept = [p for p in parts if p.shape[1]]
        self.parts: list[torch.Tensor] = kept or [first]
        self._bounds = [0, *itertools.accumulate(p.shape[1] for p in self.parts)]  # [P + 1] first token of each part
        self._starts = torch.tensor(self._bounds, dtype=torch.int64, device=first.device)  # the same, for searches
        self.shape = torch.Size((first.shape[0], self._bounds[-1], *first.shape[2:]))
        self.dtype = first.dtype
        self.device = first.device

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def is_pinned(self) -> bool:
        return all(p.is_pinned() for p in self.parts)

    def dim(self) -> int:
        return 4

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TokenSegments(shape={tuple(self.shape)}, parts={len(self.parts)}, dtype={self.dtype})"

    def row(self, i: int) -> TokenSegments:
        """Batch row ``i`` as a ``[1, T, H, D]`` sequence (views, no copy)."""
        if self.shape[0] == 1 and i in (0, -1):  # one row (every offloaded gather): itself, bounds and all
            return self
        return TokenSegments([p[i : i + 1] for p in self.parts])

    def materialize(self) -> torch.Tensor:
        """The whole sequence as one new tensor ``[B, T, H, D]`` (a copy)."""
        return torch.cat(self.parts, dim=1)

    def __getitem__(self, item: object) -> torch.Tensor:
        if isinstance(item, tuple) and len(item) != 2:
            raise IndexError("TokenSegments supports x[rows, token_range] only")
        rows, tokens = item if isinstance(item, tuple) else (item, slice(None))
        if not isinstance(tokens, slice) or tokens.step not in (None, 1):
            raise IndexError("TokenSegments: the token index must be a range (a slice with no step)")
        a, b, _ = tokens.indices(self.shape[1])
        b = max(a, b)
        pieces = []
        for j, part in enumerate(self.parts):
            s, e = self._bounds[j], self._bounds[j + 1]
            if e <= a or s >= b:
                continue
            pieces.append(part[:, max(a, s) - s : min(b, e) - s])
        if not pieces:
            pieces = [self.parts[0][:, :0]]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out[rows]

    def index_select(self, dim: int, index: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``index`` (1-D int64, any order, on this device): ``[B, len(index), H, D]``.

        One ``index_select`` per part that holds some of them. A sorted ``index`` (what selection
        produces: blocks in their original order) is cut at the part bounds by one binary search and
        each part writes a contiguous range of ``out``; any other order groups tokens by part first.
        """
        if dim != 1:
            raise IndexError("TokenSegments gathers along the token axis (dim=1) only")
        if index.dim() != 1:
            raise IndexError("index must be 1-D")
        n = index.numel()
        if n and (int(index.min()) < 0 or int(index.max()) >= self.shape[1]):
            raise IndexError(f"token index out of range for {self.shape[1]} tokens")
        if out is None:
            out = torch.empty((self.shape[0], n, *self.shape[2:]), dtype=self.dtype, device=self.device)
        if len(self.parts) == 1:
            return torch.index_select(self.parts[0], 1, index, out=out)
        if n and out.is_contiguous() and bool((index[1:] >= index[:-1]).all()):
            # [P + 1] where each part's tokens start in the sorted index
            cuts = torch.searchsorted(index, self._starts).tolist()
            for j, part in enumerate(self.parts):
                lo, hi = cuts[j], cuts[j + 1]
                if hi > lo:
                    dest = out[:, lo:hi]
                    if dest.is_contiguous():  # one batch row (the offloaded gather): write in place
                        torch.index_select(part, 1, index[lo:hi] - self._bounds[j], out=dest)
                    else:
                        dest.copy_(part.index_select(1, index[lo:hi] - self._bounds[j]))
            return out
        part = torch.searchsorted(self._starts[1:], index, right=True)  # [n] which part holds each token
        order = torch.argsort(part, stable=True)
        runs, counts = torch.unique_consecutive(part[order], return_counts=True)
        at = 0
        for j, c in zip(runs.tolist(), counts.tolist(), strict=True):
            where = order[at : at + c]
            out[:, where] = self.parts[j].index_select(1, index[where] - self._bounds[j])
            at += c
        return out
