"""Running top-k sets in registers: per row, ``KP`` (value, index) slots whose worst entry is the
admission threshold. Shared by the scan, the split merge and phase 2 (see kernels/README.md)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pick_best(b_v, b_i, o_j, KP: tl.constexpr):
    """Best entry of each row of a (value, index) set ``[BM, KP]``: max value, then min index."""
    b_best = tl.max(b_v, 1)
    # a unique key per slot: empty slots share index -1 and are told apart by their column
    b_key = tl.where(b_v == b_best[:, None], b_i.to(tl.int64) * KP + o_j[None, :], 2**62)
    b_kmin = tl.min(b_key, 1)
    m_hit = b_key == b_kmin[:, None]
    b_idx = tl.where(b_best == float("-inf"), -1, tl.sum(tl.where(m_hit, b_i, 0), 1))
    return b_idx, m_hit


@triton.jit
def _empty_set(BM: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr):
    """Empty (value, index) sets ``[BM, KP]`` and their worst values ``[BM]``: padding slots
    (``j >= TOPK``) hold +inf so they are never the worst entry."""
    o_j = tl.arange(0, KP)
    b_v = tl.where(o_j[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([BM, KP], dtype=tl.float32)
    return b_v, tl.full([BM, KP], -1, dtype=tl.int32), tl.full([BM], float("-inf"), dtype=tl.float32)


@triton.jit
def _admit(
    b_s,
    b_ci,
    n0,
    b_v,
    b_i,
    b_kth,
    o_c,
    o_j,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BN: tl.constexpr,
    GATHER: tl.constexpr,
):
    """Admit the candidates ``b_s [BM, BN]`` (visited in ascending index order among equal values)
    into the running sets ``b_v, b_i [BM, KP]``; their indices are ``b_ci`` or ``n0 + column``."""
    b_m = tl.max(b_s, 1)
    b_up = b_m > b_kth
    # a row gains at most TOPK keys per tile; an unrolled chain of guarded steps (rather than a
    # while loop) keeps the tile loop pipelinable
    for _ in tl.static_range(TOPK):
        if tl.max(b_up.to(tl.int32), 0) > 0:
            b_a = tl.min(tl.where(b_s == b_m[:, None], o_c[None, :], BN), 1)
            m_a = o_c[None, :] == b_a[:, None]
            if GATHER:
                b_ai = tl.sum(tl.where(m_a, b_ci, 0), 1)
            else:
                b_ai = n0 + b_a
            # replace the worst slot (min value, then max index) of every improving row
            b_wkey = tl.where(b_v == b_kth[:, None], b_i.to(tl.int64) * KP + o_j[None, :], -(2**62))
            m_w = (b_wkey == tl.max(b_wkey, 1)[:, None]) & b_up[:, None]
            b_v = tl.where(m_w, b_m[:, None], b_v)
            b_i = tl.where(m_w, b_ai[:, None], b_i)
            b_kth = tl.min(b_v, 1)
            b_s = tl.where(m_a, float("-inf"), b_s)
            b_m = tl.max(b_s, 1)
            b_up = b_m > b_kth
    return b_v, b_i, b_kth


@triton.jit
def _keep_best(b_x, i_x, b_v, b_i, b_kth, o_j, KP: tl.constexpr):
    """Enter each row's value ``b_x [BM]`` (index ``i_x``, the same for all rows) into its set
    ``b_v, b_i [BM, KP]`` where it beats the worst entry ``b_kth``, replacing the worst value with the
    largest index: values come in ascending index order, so among equals the lowest indices stay."""
    # int32 keys: tile indices are far below 2**31 / KP
    b_wkey = tl.where(b_v == b_kth[:, None], b_i * KP + o_j[None, :], -(2**30))
    m_w = (b_wkey == tl.max(b_wkey, 1)[:, None]) & (b_x > b_kth)[:, None]
    b_v = tl.where(m_w, b_x[:, None], b_v)
    b_i = tl.where(m_w, i_x, b_i)
    return b_v, b_i, tl.min(b_v, 1)


@triton.jit
def _store_sorted(b_v, b_i, o_j, p_o, p_wv, m_r, TOPK: tl.constexpr, KP: tl.constexpr, VALUES: tl.constexpr):
    """Write each row's set best first: indices (int64, -1 for empty slots) and, if asked, values."""
    b_v = tl.where(o_j[None, :] < TOPK, b_v, float("-inf"))  # padding slots hold +inf
    for j in tl.static_range(TOPK):
        b_idx, m_hit = _pick_best(b_v, b_i, o_j, KP)
        if VALUES:
            tl.store(p_wv + j, tl.max(b_v, 1), mask=m_r)
            tl.store(p_o + j, b_idx, mask=m_r)
        else:
            tl.store(p_o + j, b_idx.to(tl.int64), mask=m_r)
        b_v = tl.where(m_hit, float("-inf"), b_v)
        b_i = tl.where(m_hit, 2**30, b_i)
