"""KV-cache bookkeeping: the block allocator (phase 08) and the radix-tree prefix cache (phase 09).

Both work on block ids only, on the CPU; the KV tensors the ids point into come with the paged KV cache.
"""

from minivllm.cache.block_allocator import BlockAllocator, OutOfBlocksError
from minivllm.cache.radix import CacheStats, InsertResult, MatchResult, RadixCache, RadixNode

__all__ = [
    "BlockAllocator",
    "CacheStats",
    "InsertResult",
    "MatchResult",
    "OutOfBlocksError",
    "RadixCache",
    "RadixNode",
]
