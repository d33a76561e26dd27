"""Selection invariants: GQA pairing, exact tie-breaking, votes, block merging, scope bounds."""

from __future__ import annotations

import pytest
import torch

from reattention_core.attention import plan_scope
from reattention_core.attention.selection import (
    expand_blocks,
    select_blocks,
    select_in_keys,
    vote_and_clip,
    voting_rows,
)
from reattention_core.config import ReAttentionConfig
from reattention_kernels import KernelOptions
from reattention_kernels.reference import score_topk_ref
from reattention_kernels.reference.attention import scope_indices


def brute_topk(q, k, top_k):
    """Sort every row in full: (score desc, index asc)."""
    b, tq, hq, _ = q.shape
    g = hq // k.shape[2]
    out = torch.full((b, tq, hq, top_k), -1, dtype=torch.int64)
    for bi in range(b):
        for t in range(tq):
            for h in range(hq):
                s = (k[bi, :, h // g].double() @ q[bi, t, h].double()).tolist()
                order = sorted(range(len(s)), key=lambda j: (-s[j], j))[:top_k]
                out[bi, t, h, : len(order)] = torch.tensor(order)
    return out


@pytest.mark.parametrize("hq,h", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("tk", [1, 3, 37])
def test_score_topk_matches_brute_force(hq, h, tk):
    torch.manual_seed(tk)
    q = torch.randn(2, 3, hq, 8)
    k = torch.randn(2, tk, h, 8)
    assert torch.equal(score_topk_ref(q, k, 4), brute_topk(q, k, 4))


def test_gqa_pairs_each_query_head_with_its_own_kv_head():
    # KV head 0 favours key 0, KV head 1 favours key 1; query heads 0,1 -> kv 0 and 2,3 -> kv 1.
    k = torch.zeros(1, 2, 2, 2)
    k[0, 0, 0] = torch.tensor([1.0, 0.0])
    k[0, 1, 1] = torch.tensor([1.0, 0.0])
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 4, 2).clone()
    hits = score_topk_ref(q, k, 1)[0, 0, :, 0].tolist()
    assert hits == [0, 0, 1, 1]


def test_exact_ties_resolve_to_lower_index():
    k = torch.ones(1, 40, 1, 4)  # every key identical: all scores tie
    k[0, 33] = 2.0  # one clear winner
    q = torch.ones(1, 2, 1, 4)
    assert score_topk_ref(q, k, 3)[0, 0, 0].tolist() == [33, 0, 1]


def test_score_topk_pads_when_middle_is_short():
    out = score_topk_ref(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 1, 4), 4)
    assert (out[..., 2:] == -1).all() and (out[..., :2] >= 0).all()


def test_score_topk_reads_strided_views_across_slices():
    torch.manual_seed(0)
    store = torch.randn(1, 60, 2, 8)
    k = store[:, 5:50]  # a strided middle view
    q = torch.randn(1, 4, 4, 8)
    # slices of 7 keys: several slices and merges
    assert torch.equal(score_topk_ref(q, k, 5, key_slice=7), brute_topk(q, k, 5))


def test_votes_rank_positions_and_ties_prefer_lower_positions():
    hits = torch.tensor([[5, 9, 5, 2, 9, 5, 7, -1, 2]])
    # votes: 5 -> 3, 9 -> 2, 2 -> 2, 7 -> 1; keep 3 -> {5, 2, 9} (2 beats 9 on the tie), ascending
    assert vote_and_clip(hits, middle_len=10, max_blocks=3).tolist() == [[2, 5, 9]]
    # more slots than distinct hits: padding with the out-of-range marker
    assert vote_and_clip(hits, middle_len=10, max_blocks=6).tolist() == [[2, 5, 7, 9, 10, 10]]


def test_blocks_are_centred_clipped_merged_and_ordered():
    kept = torch.tensor([[1, 6, 8, 30, 40]])  # 40 = padding marker (middle_len)
    sel, n = expand_blocks(kept, block_size=4, middle_len=40)
    # windows [p-2, p+1]: [-1..2] -> 0..2 ; [4..7] ; [6..9] merges -> 4..9 ; [28..31]
    expected = [0, 1, 2, 4, 5, 6, 7, 8, 9, 28, 29, 30, 31]
    assert int(n[0]) == len(expected)
    assert sel[0, : int(n[0])].tolist() == expected


def test_blocks_clip_at_the_end_of_the_middle():
    sel, n = expand_blocks(torch.tensor([[9]]), block_size=6, middle_len=10)
    assert sel[0, : int(n[0])].tolist() == [6, 7, 8, 9]


@pytest.mark.parametrize("seed", range(5))
def test_scope_invariants_on_random_inputs(seed):
    """Sink and local always kept, original order, never over budget, GQA-consistent."""
    torch.manual_seed(seed)
    cfg = ReAttentionConfig(sink_size=4, block_size=6, top_k=3, max_blocks=5, local_window=24, prefill_chunk_size=16)
    total, tq = 200 + seed * 37, 16 if seed % 2 else 1
    k = torch.randn(1, total, 2, 8)
    q = torch.randn(1, tq, 6, 8)
    plan = plan_scope(cfg, total, tq)
    assert plan.select and plan.sink_len == 4 and plan.local_start == total - 24
    sel, n_sel = select_blocks(q, k[:, plan.sink_len : plan.local_start], top_k=3, max_blocks=5, block_size=6)
    idx = scope_indices(plan.sink_len, sel[0, : int(n_sel[0])] + plan.sink_len, plan.local_start, total).tolist()
    assert idx[:4] == [0, 1, 2, 3]
    assert idx[-24:] == list(range(total - 24, total))
    assert all(a < b for a, b in zip(idx, idx[1:], strict=False)), (
        "scope must keep the original order, without duplicates"
    )
    assert len(idx) <= cfg.scope_size
    # every selected token lies in the middle and within a block of a top-voted hit
    middle = idx[4:-24]
    assert all(4 <= t < total - 24 for t in middle)
    hits = score_topk_ref(q, k[:, 4 : total - 24], 3).flatten().tolist()
    assert all(any(abs((t - 4) - h) <= 3 for h in hits) for t in middle)


def test_short_store_attends_everything_in_place():
    cfg = ReAttentionConfig(sink_size=4, block_size=6, top_k=3, max_blocks=5, local_window=24, prefill_chunk_size=16)
    plan = plan_scope(cfg, 28, 16)
    assert not plan.select and plan.sink_len == 0 and plan.local_start == 0


def test_prefill_plan_runs_the_last_token_alone():
    from reattention_core.generation.prefill import plan_prefill

    assert plan_prefill(10, 4) == [(0, 4), (4, 8), (8, 9), (9, 10)]
    assert plan_prefill(9, 4) == [(0, 4), (4, 8), (8, 9)]
    assert plan_prefill(1, 4) == [(0, 1)]
    assert plan_prefill(0, 4) == []


def test_voting_rows_count_back_from_the_chunks_last_row():
    q = torch.arange(10.0).reshape(1, 10, 1, 1).expand(2, 10, 3, 4)
    assert voting_rows(q, 4)[0, :, 0, 0].tolist() == [1.0, 5.0, 9.0]
    assert voting_rows(q, 3)[0, :, 0, 0].tolist() == [0.0, 3.0, 6.0, 9.0]
    assert voting_rows(q, 20)[0, :, 0, 0].tolist() == [9.0]
    assert voting_rows(q, 1) is q and voting_rows(q[:, :1], 4).shape[1] == 1  # stride 1 and decode: every row


def test_a_prefill_vote_stride_selects_what_only_the_voting_rows_point_at():
    """Row 5 of a 6-row chunk points at middle key 10, row 4 at key 30: with stride 2 rows 5, 3
    and 1 vote, so key 30's block is not selected; with stride 1 it is. Decode is unchanged."""
    d, t = 8, 80
    k = torch.randn(1, t, 1, d) * 0.01
    k[0, 10, 0, 0] = k[0, 30, 0, 1] = 10.0
    q = torch.zeros(1, 6, 1, d)
    q[0, 5, 0, 0] = q[0, 4, 0, 1] = 1.0
    q[0, :4, 0, 2] = 1.0  # the other rows point at nothing in particular
    cfg = ReAttentionConfig(sink_size=4, block_size=4, top_k=1, max_blocks=8, local_window=16, prefill_chunk_size=8)
    plan = plan_scope(cfg, t, 6)

    def picked(c, rows=q):
        voting = voting_rows(rows, c.prefill_vote_stride)
        picked = select_in_keys(voting, k, plan, c, kernel_options=KernelOptions(backend="reference"))
        return set(picked.sel[0, : int(picked.n_sel[0])].tolist())

    every, strided = picked(cfg), picked(cfg.replace(prefill_vote_stride=2))
    assert {10, 30} <= every and 10 in strided and 30 not in strided
    assert picked(cfg, q[:, 4:5]) == picked(cfg.replace(prefill_vote_stride=2), q[:, 4:5])  # one row: decode
    assert 30 in picked(cfg.replace(prefill_vote_stride=2), q[:, 4:5])
