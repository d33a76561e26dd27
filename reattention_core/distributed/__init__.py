"""Multi-process ReAttention on torch.distributed: the KV store's sequence split across ranks.

* `ShardedEngine`, `init_from_env` - whole generations under ``torchrun`` (NCCL on GPUs, gloo on CPUs);
* `ShardedKVStore`, `ShardLayout` - which tokens a rank holds (`reattention_core.store.sharded`, where
  its `ShardLayer` combines the shards in each attention layer, exactly).
"""

from reattention_core.distributed.engine import ShardedEngine, init_from_env
from reattention_core.store.sharded import ShardedKVStore, ShardLayer, ShardLayout

__all__ = ["ShardLayer", "ShardLayout", "ShardedEngine", "ShardedKVStore", "init_from_env"]
