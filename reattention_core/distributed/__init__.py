"""Multi-process ReAttention on torch.distributed: the KV store's sequence split across ranks.

* `sharded_reattention_attention` - one layer over a sharded store (exact: equals the
  single-device layer);
* `ShardedKVStore`, `ShardLayout` - which tokens a rank holds;
* `enable_sharded_reattention` - run a Hugging Face model over a sharded store;
* `ShardedEngine`, `init_from_env` - whole generations under ``torchrun`` (NCCL on GPUs, gloo on CPUs).
"""

from reattention_core.distributed.attention import sharded_reattention_attention
from reattention_core.distributed.engine import ShardedEngine, init_from_env
from reattention_core.distributed.patch import enable_sharded_reattention
from reattention_core.store.sharded import ShardedKVStore, ShardLayout

__all__ = [
    "ShardLayout",
    "ShardedEngine",
    "ShardedKVStore",
    "enable_sharded_reattention",
    "init_from_env",
    "sharded_reattention_attention",
]
