"""Host side of scoring: check the inputs, plan the call (`plan`), launch the scan and what follows it."""

from __future__ import annotations

import torch
import triton

from reattention_kernels.triton_ops import select
from reattention_kernels.triton_ops.topk import merge, plan, rescore
from reattention_kernels.triton_ops.topk.plan import TopkTuning
from reattention_kernels.triton_ops.topk.scan import score_topk_fwd_kernel_scan

_DEFAULT = TopkTuning()


def _check(q: torch.Tensor, k: torch.Tensor, top_k: int, tk: int) -> None:
    b, _, hq, d = q.shape
    if not 0 <= tk <= k.shape[1]:
        raise ValueError(f"length {tk} is outside the {k.shape[1]} keys given")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if hq % k.shape[2] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[2]})")
    if not 1 <= top_k <= 8:
        raise ValueError(f"top_k must be in [1, 8], got {top_k}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")


def score_topk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    *,
    length: int | None = None,
    shift: torch.Tensor | None = None,
    tuning: TopkTuning | None = None,
    select_args: tuple[int, int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`score_topk_triton` with the choices of ``tuning`` forced (tests and benchmarks).

    ``select_args = (max_blocks, block_size, offset)`` asks for the scan's selecting epilogue: where a
    decode step's selection fits it (`plan.fused_selection`), the result is ``(sel, n_sel)`` as
    `select.select_from_hits_triton` gives it, not the hits."""
    b, tq, hq, d = q.shape
    h = k.shape[2]
    # the grid covers every row of k; the kernel scores the first `length` (+ shift) of them
    tk_grid = k.shape[1]
    tk = tk_grid if length is None else length
    _check(q, k, top_k, tk)
    g = hq // h
    if (tk == 0 and shift is None) or tk_grid == 0 or b == 0 or tq == 0:
        return torch.full((b, tq, hq, top_k), -1, dtype=torch.int64, device=q.device)
    # every slot is written by the kernels
    out = torch.empty((b, tq, hq, top_k), dtype=torch.int64, device=q.device)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if k.dtype != q.dtype:
        k = k.to(q.dtype)

    rows = tq * g
    p = plan.resolve(tuning or _DEFAULT, k, tq, g, h, d, top_k, q.dtype)
    bm, bn, warps, stages = p.config
    n_m = triton.cdiv(rows, bm)
    splits, keys_per_split = plan.key_splits(tk_grid, b * h * n_m, q.device, p.splits)
    shift_arg = out if shift is None else shift
    kp = triton.next_power_of_2(top_k)
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    o_args = (out.stride(0), out.stride(1), out.stride(2))
    k_desc = plan.TensorDescriptor(k, list(k.shape), list(k.stride()), [1, bn, 1, d]) if p.tma else k
    consts = {
        "H": h, "G": g, "D": d, "TOPK": top_k, "KP": kp, "BM": bm, "BN": bn, "IEEE": q.dtype == torch.float32,
        "SHIFT": shift is not None, "TWO_PHASE": p.two_phase, "S": p.subtiles, "TMA": p.tma, "num_warps": warps,
        "num_stages": stages,
    }  # fmt: skip
    no_select = (out, out, out, 0, 0, 0)  # counter, sel, n_sel, SK, SW, s_offset: read only with SELECT
    if splits == 1 and not p.two_phase:
        score_topk_fwd_kernel_scan[(n_m, 1, b * h)](
            q, k, k_desc, out, out, out, shift_arg, *no_select[:3], *args, *o_args, tk, rows, 1, keys_per_split,
            *no_select[3:], SPLIT=False, **consts,
        )  # fmt: skip
        return out
    # each split's best (score, key) or, in two phases, (tile maximum, tile) per row
    ws_v = torch.empty((b * h, rows, splits, top_k), dtype=torch.float32, device=q.device)
    ws_i = torch.empty((b * h, rows, splits, top_k), dtype=torch.int32, device=q.device)
    fused = None
    if select_args is not None and not p.two_phase:
        fused = plan.fused_selection(q.device, b, h * rows, top_k, *select_args)
    if fused is not None:
        # decode: the scan's last program merges the splits and selects the blocks (one launch, not three)
        sel_consts, counter, sel, n_sel, sk, sw = fused
        score_topk_fwd_kernel_scan[(n_m, splits, b * h)](
            q, k, k_desc, out, ws_v, ws_i, shift_arg, counter, sel, n_sel, *args, *o_args, tk, rows, splits,
            keys_per_split, sk, sw, select_args[2], SPLIT=True, SELECT=True, **sel_consts, **consts,
        )  # fmt: skip
        return sel, n_sel
    score_topk_fwd_kernel_scan[(n_m, splits, b * h)](
        q, k, k_desc, out, ws_v, ws_i, shift_arg, *no_select[:3], *args, *o_args, tk, rows, splits, keys_per_split,
        *no_select[3:], SPLIT=True, **consts,
    )  # fmt: skip
    bc = plan.merge_candidates(splits, top_k, 256)
    if p.two_phase and p.rescore_by == "tiles":
        br = min(16, triton.next_power_of_2(rows))
        rescore.rescore_by_tiles(q, k, ws_v, ws_i, out, shift, top_k, tk, bn // p.subtiles, br, bc, p.tile_rescore)
    elif p.two_phase:
        rescore.rescore_by_rows(q, k, ws_v, ws_i, out, shift, top_k, tk, bn // p.subtiles, bc, p.rescore)
    else:
        br, bc, merge_warps = p.merge
        merge.score_topk_fwd_kernel_merge[(triton.cdiv(rows, br), b * h)](
            ws_v, ws_i, out, *o_args, rows, splits, H=h, G=g, TOPK=top_k, KP=kp, BR=br, BC=bc, num_warps=merge_warps
        )
    return out


def score_topk_triton(
    q: torch.Tensor, k: torch.Tensor, top_k: int, *, length: int | None = None, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact per-row, per-head top-k of raw ``q . k`` over all keys, fused (no score matrix).

    Args:
        q (torch.Tensor): pre-RoPE queries of shape ``[B, TQ, HQ, D]``, fp16/bf16/fp32.
        k (torch.Tensor): pre-RoPE keys of shape ``[B, TK, H, D]``; any strides with a contiguous
            last dim (e.g. the middle slice of the key store), ``HQ % H == 0``.
        top_k (int): keys kept per (row, query head), 1 to 8.
        length (int | None): score only the first ``length`` keys (default: all ``TK``).
        shift (torch.Tensor | None): int64 ``[1]`` on the device, added there to ``length`` (see
            `reattention_kernels.score_topk`); the grid covers all ``TK`` rows of ``k``.

    Returns:
        torch.Tensor: int64 ``[B, TQ, HQ, top_k]`` indices into ``TK``, best first (fp32 score
        descending, index ascending on ties), ``-1`` in slots beyond the scored keys.
    """
    return score_topk_fwd(q, k, top_k, length=length, shift=shift)


def score_select_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    top_k: int,
    max_blocks: int,
    block_size: int,
    offset: int = 0,
    *,
    length: int | None = None,
    shift: torch.Tensor | None = None,
    fuse_selection: bool = False,
    small_selection: bool = True,
    tuning: TopkTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_topk_triton`, then `select.select_from_hits_triton` of each batch row's hits over a
    middle of ``length`` (+ ``shift``) keys of ``k``: ``(sel, n_sel)`` as that returns.

    ``fuse_selection``: a decode step whose hits the one-program selection takes runs as one kernel
    (the scan's last program per batch row merges the splits and selects); anything else takes the
    separate kernels. ``small_selection``: as in `select.select_from_hits_triton` (``False`` also
    declines the fused path, which selects in registers)."""
    ask = (max_blocks, block_size, offset) if fuse_selection and small_selection else None
    got = score_topk_fwd(q, k, top_k, length=length, shift=shift, tuning=tuning, select_args=ask)
    if isinstance(got, tuple):
        return got
    middle_len = k.shape[1] if length is None else length
    return select.select_from_hits_triton(
        got.reshape(got.shape[0], -1), middle_len, max_blocks, block_size, offset, shift=shift,
        max_middle_len=k.shape[1], small=small_selection,
    )  # fmt: skip
