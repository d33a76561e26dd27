"""`score_topk_triton` against `score_topk_ref`: indices must be exactly equal."""

from __future__ import annotations

import pytest
import torch

from reattention_kernels import KernelOptions, score_topk
from reattention_kernels.reference import score_topk_ref

TRITON = KernelOptions(backend="triton")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_keys(b: int, tk: int, h: int, d: int, dtype: torch.dtype, device: str, kind: str, offset: int = 5):
    """Keys ``[b, tk, h, d]`` as a strided slice (starting at ``offset``) of a bigger store.

    ``kind``: ``randn``; ``dup`` (randn with exact duplicate rows, like repeated tokens in layer 0);
    ``int`` (small integers: every dot product is exact, so ties are everywhere).
    """
    store = torch.randn(b, offset + tk + 3, h, d, device=device)
    if kind == "int":
        store = store.mul(1.2).round().clamp(-2, 2)
    keys = store[:, offset : offset + tk]
    if kind == "dup" and tk > 1:
        src = torch.randint(0, tk, (tk // 3 + 1,), device=device)
        dst = torch.randint(0, tk, (tk // 3 + 1,), device=device)
        keys[:, dst] = keys[:, src]
    return store.to(dtype)[:, offset : offset + tk]


def make_queries(b: int, tq: int, hq: int, d: int, dtype: torch.dtype, device: str, kind: str):
    q = torch.randn(b, tq, hq, d, device=device)
    if kind == "int":
        q = q.mul(1.2).round().clamp(-2, 2)
    return q.to(dtype)


def check(b, tq, tk, hq, h, d, dtype, top_k, kind, device, seed=0):
    torch.manual_seed(seed)
    q = make_queries(b, tq, hq, d, DTYPES[dtype], device, kind)
    k = make_keys(b, tk, h, d, DTYPES[dtype], device, kind)
    assert k.storage_offset() > 0  # a view into the store, not a fresh tensor
    out = score_topk(q, k, top_k, kernel_options=TRITON)
    ref = score_topk_ref(q, k, top_k)
    assert out.dtype == torch.int64 and out.shape == (b, tq, hq, top_k)
    mismatch = (out != ref).any(-1)
    assert not mismatch.any(), f"{int(mismatch.sum())} rows differ; first: {out[mismatch][0]} vs {ref[mismatch][0]}"


# (B, TQ, TK, HQ, H, D, dtype, top_k, kind)
CASES = [
    (1, 1, 1, 4, 1, 64, "fp32", 4, "randn"),
    (1, 1, 3, 4, 4, 64, "fp32", 8, "randn"),
    (2, 1, 37, 4, 1, 64, "fp32", 4, "dup"),
    (1, 1, 130, 3, 1, 64, "fp16", 8, "dup"),
    (1, 1, 300, 32, 8, 128, "fp16", 4, "randn"),
    (1, 1, 300, 9, 3, 64, "fp32", 8, "int"),
    (2, 3, 37, 6, 2, 128, "fp32", 5, "int"),
    (1, 7, 130, 12, 3, 64, "fp16", 8, "int"),
    (1, 9, 130, 8, 2, 64, "fp32", 3, "dup"),
    (2, 5, 300, 4, 4, 64, "fp16", 8, "dup"),
    (1, 17, 64, 3, 3, 128, "fp32", 2, "randn"),
    (1, 4, 6, 8, 2, 64, "fp32", 8, "int"),
]


@pytest.mark.parametrize(
    ("b", "tq", "tk", "hq", "h", "d", "dtype", "top_k", "kind"),
    [pytest.param(*c, id="B{}-TQ{}-TK{}-HQ{}-H{}-D{}-{}-k{}-{}".format(*c)) for c in CASES],
)
def test_score_topk(b, tq, tk, hq, h, d, dtype, top_k, kind, device):
    check(b, tq, tk, hq, h, d, dtype, top_k, kind, device)


@pytest.mark.parametrize("top_k", range(1, 9))
def test_score_topk_every_k(top_k, device):
    check(1, 2, 70, 4, 2, 64, "fp32", top_k, "int", device, seed=top_k)


@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("tq", [1, 6])
def test_score_topk_splits(tq, splits, device):
    """The split-K path (partial sets + merge) and the single-pass path agree with the reference."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    torch.manual_seed(splits)
    q = make_queries(1, tq, 8, 64, torch.float32, device, "int")
    k = make_keys(1, 200, 2, 64, torch.float32, device, "int")
    out = score_topk_fwd(q, k, 8, tuning=TopkTuning(splits=splits))
    torch.testing.assert_close(out, score_topk_ref(q, k, 8), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("two_phase", "subtiles", "rescore_by"),
    [
        (False, 1, "tiles"),
        (True, 1, "tiles"),
        (True, 2, "tiles"),
        (True, 4, "tiles"),
        (True, 1, "rows"),
        (True, 2, "rows"),
    ],
)
@pytest.mark.parametrize(
    ("b", "tq", "tk", "hq", "h", "d", "dtype", "top_k", "kind", "splits"),
    [
        (1, 1, 300, 9, 3, 64, "fp32", 8, "int", None),
        (2, 3, 37, 6, 2, 128, "fp32", 5, "int", None),  # fewer tiles than top_k
        (1, 7, 299, 12, 3, 64, "fp16", 4, "int", 1),  # ties everywhere: tile maxima tie too
        (1, 9, 301, 8, 2, 64, "fp32", 3, "dup", 3),
        (2, 5, 300, 4, 4, 64, "fp16", 8, "dup", 2),
        (1, 6, 640, 3, 1, 64, "fp32", 1, "int", 1),
        (1, 6, 640, 6, 2, 64, "fp32", 4, "randn", 1),
    ],
)
def test_score_topk_phases(b, tq, tk, hq, h, d, dtype, top_k, kind, splits, two_phase, subtiles, rescore_by, device):
    """One pass and two phases (each row's best tile or sub-tile maxima, then rescoring those, by
    tile or by row) all equal the reference, decode and prefill shapes alike."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    torch.manual_seed(tk + tq)
    q = make_queries(b, tq, hq, d, DTYPES[dtype], device, kind)
    k = make_keys(b, tk, h, d, DTYPES[dtype], device, kind)
    tuning = TopkTuning(splits=splits, two_phase=two_phase, subtiles=subtiles, rescore_by=rescore_by)
    out = score_topk_fwd(q, k, top_k, tuning=tuning)
    ref = score_topk_ref(q, k, top_k)
    mismatch = (out != ref).any(-1)
    assert not mismatch.any(), f"{int(mismatch.sum())} rows differ; first: {out[mismatch][0]} vs {ref[mismatch][0]}"


@pytest.mark.parametrize("subtiles", [1, 2, 4])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("top_k", [4, 8])
def test_two_phases_rescore_a_tile_that_holds_several_hits(device, splits, top_k, subtiles):
    """Phase 1 keeps one maximum per tile; when one tile holds all of a row's best keys, phase 2
    must still return every one of them (and rows that favour other keys theirs)."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    torch.manual_seed(top_k + splits)
    q = make_queries(1, 6, 4, 64, torch.float32, device, "randn")
    k = make_keys(1, 300, 2, 64, torch.float32, device, "randn")
    # query token 0's heads all point at keys 40..47 of their KV head (inside one tile of 32),
    # with growing weight; the other tokens' rows score as they fall
    for h in range(2):
        direction = q[0, 0, 2 * h : 2 * h + 2].float().sum(0)
        for j in range(8):
            k[0, 40 + j, h] = (direction * (3 + j)).to(k.dtype)
    tuning = TopkTuning(splits=splits, two_phase=True, config=(16, 32, 4, 1), subtiles=subtiles)
    out = score_topk_fwd(q, k, top_k, tuning=tuning)
    ref = score_topk_ref(q, k, top_k)
    assert (ref[0, 0] >= 40).all() and (ref[0, 0] < 48).all()  # the setup did what it says
    mismatch = (out != ref).any(-1)
    assert not mismatch.any(), f"{int(mismatch.sum())} rows differ; first: {out[mismatch][0]} vs {ref[mismatch][0]}"


@pytest.mark.parametrize("subtiles", [1, 4])
def test_rescore_by_tiles_when_many_rows_share_tiles(device, subtiles):
    """Phase 2 by tile: every row of a KV head picks the same tiles, so one tile's pairs fill
    several programs of ``W`` pairs, and the pairs of two sequences and two heads meet in one
    program; rows of the other heads pick tiles as they fall. All must equal the reference."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd
    from reattention_kernels.triton_ops.topk.plan import tile_rescore_config

    torch.manual_seed(subtiles)
    tq, hq, h = 9, 4, 2
    q = make_queries(2, tq, hq, 64, torch.float32, device, "randn")
    k = make_keys(2, 203, h, 64, torch.float32, device, "randn")
    q[1, :, :2] = q[1, 0, 0]  # sequence 1, KV head 0: one query for all 9 tokens and both heads
    assert tq * 2 > tile_rescore_config()[0]  # each shared tile's pairs fill more than one program
    out = score_topk_fwd(q, k, 4, tuning=TopkTuning(two_phase=True, subtiles=subtiles, splits=2, rescore_by="tiles"))
    ref = score_topk_ref(q, k, 4)
    assert (ref[1, :, :2] == ref[1, :1, :1]).all()  # the setup did what it says
    mismatch = (out != ref).any(-1)
    assert not mismatch.any(), f"{int(mismatch.sum())} rows differ; first: {out[mismatch][0]} vs {ref[mismatch][0]}"


@pytest.mark.parametrize(
    ("b", "tq", "tk", "hq", "h", "d", "dtype", "top_k", "kind", "splits", "subtiles"),
    [
        (2, 5, 301, 8, 2, 64, "fp32", 4, "randn", 2, 1),
        (1, 7, 299, 12, 3, 64, "fp16", 4, "int", None, 2),  # ties everywhere
        (2, 3, 130, 6, 2, 128, "fp32", 5, "dup", 1, 1),
    ],
)
def test_phase1_through_a_tensor_descriptor(b, tq, tk, hq, h, d, dtype, top_k, kind, splits, subtiles, device):
    """Phase 1 with full key tiles loaded through a TMA descriptor of the key view (batch, split and
    KV head coordinates; the masked tail through pointers) equals the reference."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    torch.manual_seed(tk + b)
    q = make_queries(b, tq, hq, d, DTYPES[dtype], device, kind)
    k = make_keys(b, tk, h, d, DTYPES[dtype], device, kind, offset=8)  # a 16-byte aligned view
    out = score_topk_fwd(q, k, top_k, tuning=TopkTuning(splits=splits, two_phase=True, subtiles=subtiles, tma=True))
    ref = score_topk_ref(q, k, top_k)
    mismatch = (out != ref).any(-1)
    assert not mismatch.any(), f"{int(mismatch.sum())} rows differ; first: {out[mismatch][0]} vs {ref[mismatch][0]}"


def test_phase2_rescores_by_rows_for_small_chunks_and_by_tiles_for_large():
    """The embedded model's chunks rescore by rows (faster on an H100) and Llama-8B's by tile."""
    from reattention_kernels.triton_ops.topk import plan

    # KV heads x rows x top-k x tile keys x head dim x bytes, as score_topk_fwd counts them
    assert plan.rescore_by(3 * (256 * 3) * 4 * 64 * 64 * 2) == "rows"  # SmolLM2, 256-token chunk
    assert plan.rescore_by(8 * (512 * 4) * 4 * 64 * 128 * 2) == "tiles"  # Llama-8B, 512-token chunk


def test_decode_tiles_hold_256_keys_at_head_dim_64(monkeypatch):
    """On a GPU, one pass over a decode step's few rows takes 256-key tiles at head dim 64 (a tile's bytes
    as at head dim 128, faster on an H200) and 128-key tiles otherwise."""
    from reattention_kernels.triton_ops.topk import plan

    monkeypatch.setattr(plan, "interpreting", lambda: False)
    assert plan.block_config(3, torch.bfloat16, 64) == (16, 256, 4, 3)  # the embedded model's decode step
    assert plan.block_config(4, torch.bfloat16, 128) == (16, 128, 4, 3)  # Llama-8B's
    assert plan.block_config(24, torch.float16, 64)[:2] == (32, 128)  # more rows: 128 keys
    assert plan.block_config(3, torch.float32, 64)[1] == 32
    assert plan.block_config(3, torch.bfloat16, 64, two_phase=True)[1] == 64


def test_rescore_by_must_be_tiles_or_rows(device):
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    q = torch.randn(1, 4, 4, 64, device=device)
    k = torch.randn(1, 100, 2, 64, device=device)
    with pytest.raises(ValueError, match="rescore_by"):
        score_topk_fwd(q, k, 4, tuning=TopkTuning(two_phase=True, rescore_by="keys"))


def test_subtiles_must_divide_the_tile_and_need_two_phases(device):
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    q = torch.randn(1, 4, 4, 64, device=device)
    k = torch.randn(1, 100, 2, 64, device=device)
    with pytest.raises(ValueError, match="subtiles"):
        score_topk_fwd(q, k, 4, tuning=TopkTuning(two_phase=True, subtiles=3))
    with pytest.raises(ValueError, match="subtiles"):
        score_topk_fwd(q, k, 4, tuning=TopkTuning(two_phase=False, subtiles=2))


def test_score_topk_identical_keys(device):
    """All keys equal: every score ties, so the answer is the first top_k indices."""
    q = torch.randn(1, 2, 4, 64, device=device)
    k = torch.randn(1, 1, 2, 64, device=device).expand(1, 100, 2, 64)
    out = score_topk(q, k, 6, kernel_options=TRITON)
    assert (out == torch.arange(6, device=device)).all()


@pytest.mark.parametrize("tk", [5, 37, 100, 513, 1025])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_reference_scores_identical_keys_identically(tk, rows):
    """CPU GEMMs round a partial last column tile differently; the reference must not (tie rule)."""
    torch.manual_seed(tk + rows)
    k = torch.randn(1, tk, 3, 64)
    k[:, :, 1] = torch.randn(64)  # every key of head 1 is the same vector (a repeated token)
    q = torch.randn(1, rows, 6, 64)
    out = score_topk_ref(q, k, 4)[:, :, 2:4]  # query heads 2 and 3 read KV head 1
    assert (out == torch.arange(4)).all()


def test_score_topk_empty(device):
    q = torch.randn(1, 1, 4, 64, device=device)
    k = torch.randn(1, 0, 2, 64, device=device)
    assert (score_topk(q, k, 3, kernel_options=TRITON) == -1).all()


GPU_CASES = [
    (1, 1, 131072, 9, 3, 64, "bf16", 8, "randn"),
    (1, 1, 131072, 32, 8, 128, "bf16", 8, "randn"),
    (1, 1, 131072, 32, 8, 128, "bf16", 4, "int"),
    (1, 64, 131072, 9, 3, 64, "bf16", 8, "int"),
    (2, 33, 131072, 32, 8, 128, "bf16", 8, "randn"),
    (1, 1, 1000003, 32, 8, 128, "fp16", 8, "dup"),
    (1, 1, 1000003, 9, 3, 64, "bf16", 4, "dup"),  # the embedded model's decode step: 256-key tiles, a masked tail
    (1, 256, 1048576, 9, 3, 64, "bf16", 4, "randn"),  # the embedded model's prefill chunk at 1M
    (1, 1024, 65536, 32, 8, 128, "bf16", 8, "int"),  # 4096 rows per KV head: 256-row tiles, ties everywhere
    (1, 512, 32768, 32, 8, 128, "bf16", 8, "int"),  # up to 32K keys phase 1 ranks half tiles, ties everywhere
    (1, 256, 20000, 9, 3, 64, "bf16", 4, "dup"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("b", "tq", "tk", "hq", "h", "d", "dtype", "top_k", "kind"),
    [pytest.param(*c, id="B{}-TQ{}-TK{}-HQ{}-H{}-D{}-{}-k{}-{}".format(*c)) for c in GPU_CASES],
)
def test_score_topk_gpu(b, tq, tk, hq, h, d, dtype, top_k, kind):
    check(b, tq, tk, hq, h, d, dtype, top_k, kind, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(("two_phase", "subtiles"), [(False, 1), (True, 1), (True, 2), (True, 4)])
@pytest.mark.parametrize("kind", ["int", "dup"])
def test_score_topk_gpu_phases(kind, two_phase, subtiles):
    """Both prefill paths at a realistic shape, ties included (int keys tie everywhere)."""
    from reattention_kernels.triton_ops.topk import TopkTuning, score_topk_fwd

    torch.manual_seed(1)
    q = make_queries(1, 128, 9, 64, torch.bfloat16, "cuda", kind)
    k = make_keys(1, 65537, 3, 64, torch.bfloat16, "cuda", kind)
    out = score_topk_fwd(q, k, 4, tuning=TopkTuning(two_phase=two_phase, subtiles=subtiles))
    assert (out == score_topk_ref(q, k, 4)).all()


@pytest.mark.gpu
def test_score_topk_gpu_no_sync():
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 65536, 8, 128, device="cuda", dtype=torch.bfloat16)
    score_topk(q, k, 8, kernel_options=TRITON)  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        score_topk(q, k, 8, kernel_options=TRITON)
    finally:
        torch.cuda.set_sync_debug_mode("default")
