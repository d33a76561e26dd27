from __future__ import annotations

import math

import pytest
import torch

from reattention_core import ResidentStore


def _kv(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, 2, 4).clone()
    return k, -k


def test_append_returns_views_of_everything_stored():
    store = ResidentStore(num_layers=2)
    store.append(0, *_kv(3))
    keys, values = store.append(0, *_kv(2, start=3))
    assert keys.shape == (1, 5, 2, 4) and store.length(0) == 5 and store.length(1) == 0
    assert keys[0, :, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(values, -keys)
    # a view into the buffer, not a copy
    assert keys.untyped_storage().data_ptr() == store.view(0)[0].untyped_storage().data_ptr()


def test_growth_is_geometric_not_per_step():
    store = ResidentStore(num_layers=1)
    steps = 5000
    for i in range(steps):
        store.append(0, *_kv(1, start=i))
    assert store.length(0) == steps
    assert store.grow_events <= math.ceil(math.log2(steps / 256)) + 1
    assert store.view(0)[0][0, :, 0, 0].tolist() == list(range(steps))


def test_reserve_avoids_every_copy():
    store = ResidentStore(num_layers=3)
    store.reserve(4000)
    for layer in range(3):
        for i in range(0, 4000, 100):
            store.append(layer, *_kv(100, start=i))
    assert store.grow_events == 0 and store.capacity(2) == 4000


def test_truncate_forgets_the_tail():
    store = ResidentStore(num_layers=1)
    store.append(0, *_kv(10))
    store.truncate(4)
    keys, _ = store.append(0, *_kv(2, start=100))
    assert keys[0, :, 0, 0].tolist() == [0, 1, 2, 3, 100, 101]


def test_nbytes_counts_all_buffers_or_those_on_one_device_type():
    store = ResidentStore(2)
    k = torch.zeros(1, 10, 2, 4)
    store.append(0, k, k)
    store.append(1, k, k)
    assert store.nbytes() == 4 * store.capacity() * 2 * 4 * 4 == store.nbytes("cpu")
    assert store.nbytes("cuda") == 0


def test_a_store_that_cannot_grow_raises_a_typed_error_with_advice():
    from reattention_core import StoreMemoryError

    store = ResidentStore(1)
    k = torch.zeros(1, 4, 2, 4)
    store.append(0, k, k)
    with pytest.raises(StoreMemoryError, match=r"could not allocate .* GiB in cpu for one layer's keys") as info:
        store.reserve(2**50)  # petabytes: the allocator refuses at once
    assert isinstance(info.value, MemoryError) and "shorten the context" in str(info.value)
    assert store.length(0) == 4 and torch.equal(store.view(0)[0], k)  # what it held is intact


def test_memory_advice_names_the_way_out_for_each_place():
    from reattention_core.store.resident import _memory_advice

    exc = RuntimeError("CUDA out of memory. Tried to allocate 3.00 GiB\nmore lines")
    gpu = _memory_advice("keys", (1, 2**20, 3, 64), torch.bfloat16, torch.device("cuda", 0), False, exc)
    assert "0.38 GiB in cuda:0" in gpu and "1,048,576 tokens" in gpu and 'OffloadConfig(keys="device")' in gpu
    assert "more lines" not in gpu
    pinned = _memory_advice("values", (1, 2**20, 3, 64), torch.bfloat16, torch.device("cpu"), True, exc)
    assert "pinned host memory" in pinned and "OffloadConfig(pin=False)" in pinned
