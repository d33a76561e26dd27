"""Where every layer's pre-RoPE keys and values live.

* `protocol` - `KVStore` (what the cache, the attention layer and the prefix cache use);
* `resident` - `ResidentStore`, growing buffers on the device;
* `offloaded` - `OffloadedStore` in host memory, with `bounds` (block-bound selection),
  `scope_copy` (a step's scope to the device), `spill` (memory-mapped buffers) and `segments`
  (adopted cache pages read as one sequence);
* `sharded` - `ShardedKVStore`, the sequence split across ranks.
"""

from reattention_core.store.offloaded import OffloadConfig, OffloadedStore
from reattention_core.store.protocol import CachedStore, KVStore, ShiftableStore
from reattention_core.store.resident import ResidentStore

__all__ = ["CachedStore", "KVStore", "OffloadConfig", "OffloadedStore", "ResidentStore", "ShiftableStore"]
