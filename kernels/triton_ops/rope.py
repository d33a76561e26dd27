"""RoPE for the scope attention: cos/sin tables built by a kernel, and queries rotated in a program.

Tables follow Hugging Face (fp32 math, scaled by ``attention_scaling``, cast to the input dtype);
row ``p`` does not depend on the table's length, so one table serves every layer of a step.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from reattention_kernels.dispatch import interpreting


@triton.jit(do_not_specialize=["P"])
def rope_table_kernel(inv_freq, cos_t, sin_t, P, scaling, HALF: tl.constexpr, BP: tl.constexpr):
    """Rows ``[i * BP, (i + 1) * BP)`` of the tables ``cos_t, sin_t [P, HALF]``."""
    i_p = tl.program_id(0)
    o_p = i_p * BP + tl.arange(0, BP)
    m_p = o_p < P
    o_f = tl.arange(0, HALF)
    b_f = tl.load(inv_freq + o_f).to(tl.float32)
    # [BP, HALF]
    b_x = o_p.to(tl.float32)[:, None] * b_f[None, :]
    o_t = o_p.to(tl.int64)[:, None] * HALF + o_f[None, :]
    tl.store(cos_t + o_t, (tl.cos(b_x) * scaling).to(cos_t.dtype.element_ty), mask=m_p[:, None])
    tl.store(sin_t + o_t, (tl.sin(b_x) * scaling).to(sin_t.dtype.element_ty), mask=m_p[:, None])


@triton.jit
def rotated_queries(p_q, b_qpos, m_r, cos_t, sin_t, HALF: tl.constexpr):
    """Queries rotated at ``b_qpos [BM]``, in fp32 then cast back: the halves ``[BM, HALF]`` of the
    rows ``p_q [BM, 1]`` points at (rows where ``m_r`` is false read as zeros)."""
    o_h = tl.arange(0, HALF)
    b_q1 = tl.load(p_q + o_h[None, :], mask=m_r[:, None], other=0.0)
    b_q2 = tl.load(p_q + HALF + o_h[None, :], mask=m_r[:, None], other=0.0)
    o_tq = b_qpos.to(tl.int64)[:, None] * HALF + o_h[None, :]
    b_cq = tl.load(cos_t + o_tq, mask=m_r[:, None], other=0.0).to(tl.float32)
    b_sq = tl.load(sin_t + o_tq, mask=m_r[:, None], other=0.0).to(tl.float32)
    b_q1f, b_q2f = b_q1.to(tl.float32), b_q2.to(tl.float32)
    return (b_q1f * b_cq - b_q2f * b_sq).to(b_q1.dtype), (b_q2f * b_cq + b_q1f * b_sq).to(b_q1.dtype)


def rope_table(inv_freq: torch.Tensor, length: int, attention_scaling: float, dtype: torch.dtype, device) -> tuple:
    """cos/sin ``[length, D/2]`` in ``dtype`` for positions ``0 .. length-1`` (one kernel)."""
    half = inv_freq.numel()
    inv_freq = inv_freq.to(device=device, dtype=torch.float32).contiguous()
    cos_t = torch.empty((max(length, 1), half), dtype=dtype, device=device)
    sin_t = torch.empty_like(cos_t)
    bp = 64 if interpreting() else max(1, 4096 // half)
    rope_table_kernel[(triton.cdiv(max(length, 1), bp),)](
        inv_freq, cos_t, sin_t, length, float(attention_scaling), HALF=half, BP=bp
    )
    return cos_t, sin_t


# Every layer of a step attends over a scope of the same length with the same RoPE settings, so the
# table is computed once and sliced (row p does not depend on the table's length): one launch and two
# allocations fewer per layer step. Entries hold their inv_freq tensor, so its id is not reused.
_TABLES: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
_TABLE_ENTRIES = 8
_TABLE_MAX_POSITIONS = 1 << 16  # longer scopes (full attention over a long context) are computed each time


def cached_rope_table(
    inv_freq: torch.Tensor, length: int, attention_scaling: float, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_table`, reusing a longer table made earlier for the same ``inv_freq`` tensor and settings."""
    if length > _TABLE_MAX_POSITIONS:
        return rope_table(inv_freq, length, attention_scaling, dtype, device)
    # Inference tensors (the engine's RopeSpec is made under torch.inference_mode on GPUs) keep no
    # version counter; nothing in the package writes to them, so their identity is the key.
    version = None if inv_freq.is_inference() else inv_freq._version
    key = (id(inv_freq), version, float(attention_scaling), dtype, torch.device(device))
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not inv_freq or hit[1].shape[0] < max(length, 1):
        size = min(_TABLE_MAX_POSITIONS, max(256, triton.next_power_of_2(max(length, 1))))
        hit = (inv_freq, *rope_table(inv_freq, size, attention_scaling, dtype, device))
        _TABLES[key] = hit
        while len(_TABLES) > _TABLE_ENTRIES:
            _TABLES.popitem(last=False)
    _TABLES.move_to_end(key)
    n = max(length, 1)
    return hit[1][:n], hit[2][:n]


__all__ = ["cached_rope_table", "rope_table", "rotated_queries"]
