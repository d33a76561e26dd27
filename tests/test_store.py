from __future__ import annotations

import math

import torch

from reattention_core import KVStore


def _kv(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1, 1).expand(1, n, 2, 4).clone()
    return k, -k


def test_append_returns_views_of_everything_stored():
    store = KVStore(num_layers=2)
    store.append(0, *_kv(3))
    keys, values = store.append(0, *_kv(2, start=3))
    assert keys.shape == (1, 5, 2, 4) and store.length(0) == 5 and store.length(1) == 0
    assert keys[0, :, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(values, -keys)
    # a view into the buffer, not a copy
    assert keys.untyped_storage().data_ptr() == store.view(0)[0].untyped_storage().data_ptr()


def test_growth_is_geometric_not_per_step():
    store = KVStore(num_layers=1)
    steps = 5000
    for i in range(steps):
        store.append(0, *_kv(1, start=i))
    assert store.length(0) == steps
    assert store.grow_events <= math.ceil(math.log2(steps / 256)) + 1
    assert store.view(0)[0][0, :, 0, 0].tolist() == list(range(steps))


def test_reserve_avoids_every_copy():
    store = KVStore(num_layers=3)
    store.reserve(4000)
    for layer in range(3):
        for i in range(0, 4000, 100):
            store.append(layer, *_kv(100, start=i))
    assert store.grow_events == 0 and store.capacity(2) == 4000


def test_truncate_forgets_the_tail():
    store = KVStore(num_layers=1)
    store.append(0, *_kv(10))
    store.truncate(4)
    keys, _ = store.append(0, *_kv(2, start=100))
    assert keys[0, :, 0, 0].tolist() == [0, 1, 2, 3, 100, 101]


def test_nbytes_counts_all_buffers_or_those_on_one_device_type():
    store = KVStore(2)
    k = torch.zeros(1, 10, 2, 4)
    store.append(0, k, k)
    store.append(1, k, k)
    assert store.nbytes() == 4 * store.capacity() * 2 * 4 * 4 == store.nbytes("cpu")
    assert store.nbytes("cuda") == 0
