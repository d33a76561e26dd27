"""Host planning of scoring: block shapes, key splits, phases and phase 2's design for a call.

`TopkTuning` holds the choices a caller may force (tests and benchmarks); `resolve` fills the rest
with the defaults below, each chosen by timing its alternatives (docs/design-notes.md).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton

from reattention_kernels.dispatch import interpreting
from reattention_kernels.triton_ops import select
from reattention_kernels.triton_ops.arrivals import arrival_counts

try:  # host-side tensor descriptors (TMA); Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

# Splits cover a multiple of this many keys (a multiple of every BN).
SPLIT_ALIGN = 256
MAX_SPLITS = 256
# Up to this many rows (query tokens x GQA group) the split merge runs one program per row.
MERGE_ROW_PROGRAMS_MAX_ROWS = 8
# Prefill takes two phases from this many rows; fewer rows rarely improve a set, so one pass costs them little.
TWO_PHASE_MIN_ROWS = 32
# Up to this many keys, phase 1 ranks two sub-tiles per tile by default.
SUBTILE_MAX_KEYS = 32768
# Phase 2 rescores by tile from this many bytes of keys gathered by rows.
TILES_MIN_BYTES = 256 << 20


def _tuple(value: object, n: int) -> bool:
    return isinstance(value, tuple) and len(value) == n and all(isinstance(x, int) and x > 0 for x in value)


@dataclass(frozen=True)
class TopkTuning:
    """Choices of a scoring call; ``None`` takes the default (`resolve`).

    Attributes:
        splits: key splits (programs per row block along the keys).
        config: the scan's (BM, BN, num_warps, num_stages): rows per program, keys per tile.
        two_phase: prefill in two phases (tile maxima, then phase 2) instead of one pass.
        rescore: phase 2 by rows: (rows per program, keys per step, head dims per step, num_warps).
        merge: the split merge's (rows per program, candidates per step, num_warps).
        subtiles: sub-tiles per tile that phase 1 ranks (1, 2 or 4; more than 1 needs two phases).
        rescore_by: phase 2's design, ``"rows"`` or ``"tiles"``.
        tile_rescore: phase 2 by tiles: (pairs per program, num_warps).
        tma: phase 1 loads whole key tiles through a tensor descriptor.
    """

    splits: int | None = None
    config: tuple[int, int, int, int] | None = None
    two_phase: bool | None = None
    rescore: tuple[int, int, int, int] | None = None
    merge: tuple[int, int, int] | None = None
    subtiles: int | None = None
    rescore_by: str | None = None
    tile_rescore: tuple[int, int] | None = None
    tma: bool | None = None

    def __post_init__(self) -> None:
        if self.splits is not None and (isinstance(self.splits, bool) or not isinstance(self.splits, int)
                                        or self.splits < 1):  # fmt: skip
            raise ValueError(f"splits must be a positive int, got {self.splits!r}")
        for name, n in (("config", 4), ("rescore", 4), ("merge", 3), ("tile_rescore", 2)):
            value = getattr(self, name)
            if value is not None and not _tuple(value, n):
                raise ValueError(f"{name} must be a tuple of {n} positive ints, got {value!r}")
        for name in ("two_phase", "tma"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.rescore_by not in (None, "tiles", "rows"):
            raise ValueError(f"rescore_by must be 'tiles' or 'rows', got {self.rescore_by!r}")
        if self.subtiles not in (None, 1, 2, 4) or (self.subtiles not in (None, 1) and self.two_phase is False):
            raise ValueError(f"subtiles must be 1, 2 or 4 and come with two phases, got {self.subtiles!r}")


@functools.cache
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    if interpreting() or device.type != "cuda":
        return 4
    # about two programs per SM: enough bytes in flight, and splits long enough for the early-out
    return 2 * num_sms(device.index if device.index is not None else torch.cuda.current_device())


def key_splits(tk_grid: int, programs: int, device: torch.device, splits: int | None = None) -> tuple[int, int]:
    """(splits, keys per split) of ``tk_grid`` keys for ``programs`` row-block programs: by default
    the whole number of splits that brings the programs nearest `target_programs` (a whole wave,
    not one and a half), each a multiple of the split alignment long."""
    if splits is None:
        splits = min(max(1, (2 * target_programs(device) + programs) // (2 * programs)), MAX_SPLITS)
    align = 32 if interpreting() else SPLIT_ALIGN
    splits = max(1, min(splits, triton.cdiv(tk_grid, align)))
    keys_per_split = triton.cdiv(triton.cdiv(tk_grid, splits), align) * align
    return triton.cdiv(tk_grid, keys_per_split), keys_per_split


def block_config(rows: int, dtype: torch.dtype, d: int, two_phase: bool = False) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of the scan for ``rows`` rows per KV head and head dim ``d``.

    One pass takes 64-row tiles: a tile's extraction steps run whenever any of its rows improves, so
    larger row blocks lose. Phase 1 has no such steps and takes 128 rows (256 from 4096 rows), halving
    the key reads per row. Decode at head dim 64 takes 256-key tiles, so that a tile holds as many
    bytes in flight as a 128-key tile at head dim 128.
    """
    if interpreting():
        return (32 if two_phase else 16), 32, 4, 1
    if dtype == torch.float32:
        return min(64, max(16, triton.next_power_of_2(rows))), 32, 4, 2
    if two_phase:
        return (256 if rows >= 4096 else min(128, max(16, triton.next_power_of_2(rows)))), 64, 8, 3
    bm = min(64, max(16, triton.next_power_of_2(rows)))
    return bm, (256 if d <= 64 and bm == 16 else 128), 4, 3


def default_subtiles(keys: int, bn: int) -> int:
    """Phase 1's sub-tiles per tile when phase 2 rescores by rows: two halve phase 2's reads but
    make phase 1 slower, which pays only on short key ranges (phase 1 grows with the keys, phase 2
    does not)."""
    return 2 if keys <= SUBTILE_MAX_KEYS and bn == 64 else 1


def rescore_config(br: int, bn: int, d: int) -> tuple[int, int, int, int]:
    """Phase 2 by rows: (rows per program, keys per step, head dims per step, num_warps), with the
    merge's ``br`` rows: a whole tile per step, 16 head dims at a time."""
    if interpreting():
        # several steps per tile and per head dim, so the tests cover the loops
        return br, min(bn, 16), min(d, 16), 4
    return br, bn, min(d, 16), 4


def use_tma(k: torch.Tensor, bm: int, subtiles: int) -> bool:
    """Whether phase 1 reads whole key tiles through a tensor descriptor: on devices of compute
    capability 9 and later, where the key view meets the descriptor's rules (16-byte aligned base and
    strides), for whole tiles of up to 128 rows (sub-tiles and 256-row tiles were slower with it).
    Not in the interpreter: the CPU tests force it."""
    if interpreting() or k.device.type != "cuda" or TensorDescriptor is None or subtiles != 1 or bm > 128:
        return False
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    size = k.element_size()
    return k.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in k.stride()[:-1]) and k.stride(-1) == 1


def rescore_by(gathered: int) -> str:
    """Phase 2's design for ``gathered`` bytes of keys (rows x top-k x tile keys x head dim x element
    size: what rescoring by rows reads). By tiles reads each distinct tile once per program, at the
    fixed cost of four more small kernels, so it pays for large chunks only.

    The interpreter follows the same rule, so its tiny shapes take rows, as a GPU's small chunks do
    (by tiles is several times slower there); the tests ask for tiles by name."""
    return "tiles" if gathered >= TILES_MIN_BYTES else "rows"


def tile_rescore_config() -> tuple[int, int]:
    """Phase 2 by tiles: (pairs per program, num_warps)."""
    if interpreting():
        return 16, 4
    return 16, 2


def resolve(tuning: TopkTuning, k: torch.Tensor, tq: int, g: int, h: int, d: int, top_k: int,
            dtype: torch.dtype) -> TopkTuning:  # fmt: skip
    """``tuning`` with every choice made for ``tq`` query tokens, GQA group ``g``, ``h`` KV heads and
    the keys ``k [B, TK, H, D]`` (the grid's); ``rescore`` is set only for phase 2 by rows."""
    rows, tk_grid, b = tq * g, k.shape[1], k.shape[0]
    two_phase = tuning.two_phase
    if two_phase is None:
        two_phase = tq > 1 and (interpreting() or rows >= TWO_PHASE_MIN_ROWS)
    bm, bn, _, _ = config = tuning.config or block_config(rows, dtype, d, two_phase)
    by = tuning.rescore_by
    if by is None:
        by = rescore_by(b * h * rows * top_k * (bn // (tuning.subtiles or 1)) * d * k.element_size())
    subtiles = tuning.subtiles
    if subtiles is None:
        subtiles = default_subtiles(tk_grid, bn) if two_phase and by == "rows" else 1
    if bn % subtiles or (subtiles > 1 and not two_phase):
        raise ValueError(f"subtiles must be 1, 2 or 4, divide BN ({bn}) and come with two phases, got {subtiles}")
    splits, _ = key_splits(tk_grid, b * h * triton.cdiv(rows, bm), k.device, tuning.splits)
    # one pass (decode) never loads through a descriptor, so it skips the checks
    tma = two_phase and (use_tma(k, bm, subtiles) if tuning.tma is None else tuning.tma)
    bc = merge_candidates(splits, top_k, 256)
    br = min(16, triton.next_power_of_2(rows))
    rescore = None
    if two_phase and by == "rows":
        rescore = tuning.rescore or rescore_config(br, bn // subtiles, d)
    merge = tuning.merge
    if merge is None and rows <= MERGE_ROW_PROGRAMS_MAX_ROWS:
        # decode: one program per row, more candidates per step
        merge = 1, merge_candidates(splits, top_k, 512), 4
    return dataclasses.replace(
        tuning, splits=splits, config=config, two_phase=two_phase, rescore=rescore, merge=merge or (br, bc, 4),
        subtiles=subtiles, rescore_by=by, tile_rescore=tuning.tile_rescore or tile_rescore_config(), tma=tma,
    )  # fmt: skip


def merge_candidates(splits: int, top_k: int, most: int) -> int:
    """Candidates per step of a split merge over ``splits`` sets of ``top_k`` (fewer when interpreting)."""
    return min(32 if interpreting() else most, triton.next_power_of_2(splits * top_k))


def fused_selection(device: torch.device, b: int, rows: int, top_k: int, max_blocks: int, block_size: int, offset: int):
    """``(constexprs, counter, sel, n_sel, K, W)`` of the scan's selecting epilogue for ``rows`` rows
    (KV heads x query tokens x group) per batch row of ``top_k`` hits each, or None where it does not
    fit: more hits than `select._select_small` takes, a ``[K, block]`` tile over the selection
    kernels' limit, or no arrival count to be had."""
    hrp, kp = triton.next_power_of_2(rows), triton.next_power_of_2(top_k)
    kk = min(max_blocks, rows * top_k)  # as `select.select_from_hits_triton` has it for rows x top_k hits
    skp, bsp = triton.next_power_of_2(max(kk, 1)), triton.next_power_of_2(block_size)
    if hrp * kp > select.SMALL_HITS or kk < 1 or skp * bsp > select.MAX_TILE:
        return None
    counter = arrival_counts(device, b)  # one per batch row
    if counter is None:
        return None
    width = kk * block_size
    consts = {"HRP": hrp, "BC": 32 if interpreting() else 256, "SBLOCK": select._pad_block(width), "SKP": skp,
              "BS": block_size, "BSP": bsp}  # fmt: skip
    sel = torch.empty((b, width), dtype=torch.int64, device=device)
    n_sel = torch.empty((b,), dtype=torch.int64, device=device)
    return consts, counter, sel, n_sel, kk, width
