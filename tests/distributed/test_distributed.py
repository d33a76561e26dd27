"""Sharded KV store on torch.distributed (gloo, 2 and 4 CPU processes) equals the single process.

Each world size spawns its processes once and runs every check inside them (process start-up
dominates the cost): the layer on random tensors against one resident store, then whole
greedy generations on tiny models against `ReAttentionEngine.generate`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from reattention_core import ReAttentionConfig, ReAttentionEngine
from reattention_core.attention import LayerStep, plan_scope, reattention_attention
from reattention_core.attention.rope import RopeSpec
from reattention_core.attention.selection import select_blocks, voting_rows
from reattention_core.store import ResidentStore
from reattention_kernels import KernelOptions
from tests.helpers import ByteTokenizer, tiny_model

REFERENCE = KernelOptions(backend="reference")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# Small enough to be fast, long prompts still exceed sink + local, so blocks are really selected.
CFG = ReAttentionConfig(sink_size=4, block_size=4, top_k=2, max_blocks=4, local_window=16, prefill_chunk_size=8)


def _random_text(seed: int, n: int = 72) -> str:
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?"
    g = torch.Generator().manual_seed(seed)
    return "".join(chars[i] for i in torch.randint(len(chars), (n,), generator=g).tolist())


# Varied text, not a phrase repeated: in layer 0 a repeated byte has a bitwise-identical key, and
# the single-process reference scores such keys with one matmul whose rounding can differ by
# column position (1 ulp), so its "ties" are not broken by position; the sharded path breaks
# exact ties by position, as the spec says. Identical keys are covered at the layer level.
PROMPTS = [_random_text(0), _random_text(1)]
CORPUS, QUESTION = _random_text(2, 75), "which?"  # the corpus ends inside a prefill chunk
ARCHS = ("llama", "qwen3")
MAX_NEW = 8

# (batch, tokens, query rows, query heads, kv heads, head dim, mode)
LAYER_CASES = [
    (1, 97, 1, 4, 2, 16, "reattention"),
    (1, 97, 8, 4, 2, 16, "reattention"),
    (2, 130, 3, 6, 3, 8, "reattention"),
    (1, 64, 4, 4, 4, 16, "reattention"),  # repeated keys: exact ties across shards
    (1, 60, 2, 4, 2, 16, "streaming"),
    (1, 40, 5, 4, 2, 16, "full"),
    (1, 97, 8, 4, 2, 16, "reattention", 3),  # a prefill vote stride: rows 1, 4 and 7 vote
]


def _rope(d: int) -> RopeSpec:
    return RopeSpec(
        inv_freq=1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)), attention_scaling=1.0, rope_type="default"
    )


def _step(cfg: ReAttentionConfig, d: int, options: KernelOptions = KernelOptions()) -> LayerStep:
    return LayerStep(config=cfg, rope=_rope(d), scale=0.25, kernel_options=options)


def _single_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ReAttentionConfig) -> torch.Tensor:
    """`reattention_attention` over one resident store holding ``k, v``."""
    store = ResidentStore(1)
    store.append(0, k, v)
    return reattention_attention(q, store.layer(0), _step(cfg, q.shape[-1], REFERENCE))


def _layer_inputs(case: tuple, seed: int):
    b, t, tq, hq, h, d, mode, *stride = case
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, t, h, d, generator=g)
    if seed % 4 == 3:  # a store of a few distinct keys repeated: many exact score ties
        k = k[:, torch.arange(t) % 5]
    cfg = CFG.replace(mode=mode, prefill_vote_stride=stride[0] if stride else 1)
    return torch.randn(b, tq, hq, d, generator=g), k, torch.randn(b, t, h, d, generator=g), cfg


def _bounds(t: int, world: int, seed: int) -> list[int]:
    """Uneven shard boundaries (some shards empty or inside the sink / local window)."""
    g = torch.Generator().manual_seed(100 + seed)
    cuts = sorted(torch.randint(0, t + 1, (world - 1,), generator=g).tolist())
    return [0, *cuts, t]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from reattention_core.distributed import ShardedEngine, ShardLayer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = []
        for i, case in enumerate(LAYER_CASES):
            q, k, v, cfg = _layer_inputs(case, i)
            bounds = _bounds(k.shape[1], world, i)
            s, e = bounds[rank], bounds[rank + 1]
            shard = ShardLayer(k[:, s:e], v[:, s:e], shard_start=s, total=k.shape[1])
            out = reattention_attention(q, shard, _step(cfg, q.shape[-1]))
            plan = plan_scope(cfg, k.shape[1], q.shape[1])
            sel = None
            if plan.select:
                picked = shard.select(voting_rows(q, cfg.prefill_vote_stride), plan, _step(cfg, q.shape[-1]))
                sel = [row[: int(n)].tolist() for row, n in zip(picked.sel, picked.n_sel, strict=True)]
            layer.append({"out": out.tolist(), "sel": sel, "bounds": bounds})
        results: dict = {"layer": layer, "generations": {}}
        for arch in ARCHS:
            engine = ReAttentionEngine(tiny_model(arch), ByteTokenizer(), CFG, cache=False)
            sharded = ShardedEngine(engine)
            for j, prompt in enumerate(PROMPTS):
                res = sharded.generate(prompt, max_new_tokens=MAX_NEW, progress=False)
                if rank == 0:
                    results["generations"][f"{arch}/{j}"] = list(res.token_ids)
            # a context= prompt: prefill breaks its chunks at the corpus end on every rank
            res = sharded.generate(QUESTION, context=CORPUS, max_new_tokens=MAX_NEW, progress=False)
            if rank == 0:
                results["generations"][f"{arch}/context"] = list(res.token_ids)
            if arch == ARCHS[0]:
                _leader_edge_cases(sharded, rank, results)
        if rank == 0:
            Path(out_dir, "results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _leader_edge_cases(sharded, rank: int, results: dict) -> None:
    """A bad prompt on rank 0 does not hang the others; a stream closed early stops every rank."""
    from reattention_core.errors import InvalidInputError

    if rank == 0:
        with pytest.raises(InvalidInputError):
            sharded.generate("   ", max_new_tokens=3)
        request = sharded.engine.prepare(PROMPTS[0], max_new_tokens=50)
        stream = sharded.run(list(request.ids), request.params)
        results["closed_early"] = next(stream)
        stream.close()
        sharded.shutdown()
    else:
        assert sharded.generate() is None  # the skipped bad prompt
        sharded.follow()  # the closed stream, then the shutdown
    # everyone is back in step: one more generation in lockstep
    res = sharded.generate(PROMPTS[1], max_new_tokens=MAX_NEW, progress=False)
    if rank == 0:
        results["after_edge_cases"] = list(res.token_ids)


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread than on two contended ones (OpenMP spin waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_process() -> dict[str, list[int]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokens = {}
        for arch in ARCHS:
            engine = ReAttentionEngine(tiny_model(arch), ByteTokenizer(), CFG, cache=False)
            for j, prompt in enumerate(PROMPTS):
                tokens[f"{arch}/{j}"] = list(engine.generate(prompt, max_new_tokens=MAX_NEW, progress=False).token_ids)
            request = engine.prepare(QUESTION, context=CORPUS, max_new_tokens=MAX_NEW)
            assert request.context_tokens is not None and request.context_tokens % CFG.prefill_chunk_size
            tokens[f"{arch}/context"] = list(engine.start(request, progress=False).collect().token_ids)
        return tokens
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_store_equals_single_process(world, tmp_path, single_process, one_thread):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # fork, not spawn: the children inherit torch and transformers already imported (and the
    # model classes loaded by `single_process`), which saves ~10 s per process on 2 busy cores.
    # Safe here as in DataLoader workers: no process group exists in the parent, and each child
    # runs on one thread.
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True, start_method="fork"
    )
    results = json.loads((tmp_path / "results.json").read_text())

    for i, (case, got) in enumerate(zip(LAYER_CASES, results["layer"], strict=True)):
        q, k, v, cfg = _layer_inputs(case, i)
        want = _single_device(q, k, v, cfg)
        torch.testing.assert_close(torch.tensor(got["out"]), want, rtol=1e-5, atol=1e-5)
        plan = plan_scope(cfg, k.shape[1], q.shape[1])
        if plan.select:
            voters = voting_rows(q, cfg.prefill_vote_stride)
            sel, n_sel = select_blocks(
                voters,
                k[:, plan.sink_len : plan.local_start],
                top_k=cfg.top_k,
                max_blocks=cfg.max_blocks,
                block_size=cfg.block_size,
                kernel_options=REFERENCE,
            )
            ref = [(row[: int(n)] + plan.sink_len).tolist() for row, n in zip(sel, n_sel, strict=True)]
            assert got["sel"] == ref, f"case {i}: the merged selection differs from the single-process one"
            assert all(len(r) > 0 for r in ref)

    assert results["generations"] == single_process
    assert any(len(t) == MAX_NEW for t in single_process.values()), "no generation ran to length: too weak a check"
    assert results["after_edge_cases"] == single_process["llama/1"]
    assert isinstance(results["closed_early"], str) and results["closed_early"]


def test_layout_and_store_keep_only_the_owned_tokens():
    from reattention_core.distributed import ShardedKVStore, ShardLayout

    layouts = [ShardLayout.balanced(10, r, 3) for r in range(3)]
    assert [(lay.start, lay.stop) for lay in layouts] == [(0, 4), (4, 8), (8, None)]
    k = torch.arange(13.0).reshape(1, 13, 1, 1)
    stores = [ShardedKVStore(1, lay) for lay in layouts]
    for store in stores:
        for s, e in [(0, 3), (3, 9), (9, 10), (10, 13)]:  # chunks crossing shard boundaries
            keys, _ = store.append(0, k[:, s:e], k[:, s:e])
            assert keys.shape[1] == store.local.length(0)  # the attention function gets the whole shard
        assert store.length(0) == 13
    held = [store.local.view(0)[0].flatten().tolist() for store in stores]
    assert held == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12]]
    stores[1].truncate(6)
    assert stores[1].length(0) == 6 and stores[1].local.length(0) == 2


def test_sharded_engine_needs_a_process_group(byte_tokenizer):
    from reattention_core.distributed import ShardedEngine
    from reattention_core.errors import DistributedError

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(DistributedError, match="init_from_env"):
        ShardedEngine(ReAttentionEngine(tiny_model("llama"), byte_tokenizer, CFG, cache=False))


# -- serving over a sharded store: rank 0 serves, rank 1 follows ------------------------------------

SERVE_JOBS_BEFORE_DEATH = 3  # rank 1 follows this many jobs, then dies


def _serve_worker(rank: int, world: int, init_file: str, port: int, stop_file: str) -> None:
    import datetime
    import time

    from reattention_core.app.serving import AppConfig, BackgroundServer, ServeConfig
    from reattention_core.distributed import ShardedEngine

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=8)
    )
    # keepalive well below the 8 s timeout: the parent takes seconds between requests
    sharded = ShardedEngine(ReAttentionEngine(tiny_model("llama"), ByteTokenizer(), CFG, cache=False), keepalive_s=1.0)
    if rank == 0:
        serve = ServeConfig(port=port, log_level="warning")
        with BackgroundServer(sharded.engine, serve, AppConfig(model_name="tiny"), backend=sharded):
            while not Path(stop_file).exists():
                time.sleep(0.05)
        return  # the follower is gone: no shutdown broadcast, no clean teardown to wait for
    for _ in range(SERVE_JOBS_BEFORE_DEATH):
        sharded.follow(once=True)
    os._exit(0)  # a worker rank dies without a word


def test_sharded_server_answers_like_one_process_and_fails_loudly_when_a_rank_dies(tmp_path, one_thread):
    import socket
    import time

    import httpx

    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = tmp_path / "stop"
    engine = ReAttentionEngine(
        tiny_model("llama"), ByteTokenizer(), CFG, cache=False
    )  # before the fork: shared imports
    ctx = mp.start_processes(
        _serve_worker, args=(2, str(tmp_path / "init"), port, str(stop)), nprocs=2, join=False, start_method="fork"
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the sharded server did not come up"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": PROMPTS[0]}]

        # job 1: the same answer as one process
        resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW)
        want = engine.generate(messages, max_new_tokens=MAX_NEW, progress=False)
        assert resp.choices[0].message.content == want.text and resp.usage.completion_tokens == want.completion_tokens

        # job 2: a client hangs up mid-stream; both ranks stop at the same step
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")

        # job 3: still in step
        resp = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=MAX_NEW)
        assert resp.choices[0].text == engine.generate(PROMPTS[1], max_new_tokens=MAX_NEW, progress=False).text

        # rank 1 is dead now: a clear 503, never an answer from half a store, and it stays refused
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_NEW)
        assert info.value.status_code == 503 and "restart" in info.value.message
        health = httpx.get(f"{base}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "broken"
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert info.value.status_code == 503
    finally:
        stop.touch()
        for p in ctx.processes:
            p.join(30)
            if p.is_alive():
                p.kill()


# -- NCCL on GPUs ------------------------------------------------------------------------------------


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from reattention_core.distributed import ShardedEngine

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tokens = {}
        for arch in ARCHS:
            engine = ReAttentionEngine(tiny_model(arch).to(f"cuda:{rank}"), ByteTokenizer(), CFG, cache=False)
            sharded = ShardedEngine(engine)
            for j, prompt in enumerate(PROMPTS):
                res = sharded.generate(prompt, max_new_tokens=MAX_NEW, progress=False)
                if rank == 0:
                    tokens[f"{arch}/{j}"] = list(res.token_ids)
        if rank == 0:
            Path(out_dir, "nccl.json").write_text(json.dumps(tokens))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="needs NCCL")
def test_sharded_store_on_two_gpus_over_nccl_equals_one_gpu(tmp_path):
    """The same generations as one GPU: each rank on its own GPU, collectives through NCCL, the
    kernels the engine picks on CUDA (Triton)."""
    single = {}
    for arch in ARCHS:
        engine = ReAttentionEngine(tiny_model(arch).to("cuda:0"), ByteTokenizer(), CFG, cache=False)
        for j, prompt in enumerate(PROMPTS):
            single[f"{arch}/{j}"] = list(engine.generate(prompt, max_new_tokens=MAX_NEW, progress=False).token_ids)
    mp.start_processes(
        _nccl_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    got = json.loads((tmp_path / "nccl.json").read_text())
    assert got == single
    assert any(len(t) == MAX_NEW for t in single.values()), "no generation ran to length: too weak a check"
