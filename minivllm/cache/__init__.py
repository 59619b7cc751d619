"""The KV cache: the paged pool, block tables and slot mapping, the block allocator (phase 08), and the
radix-tree prefix cache (phase 09).

The allocator, block tables and radix cache work on block ids, on the CPU; the KV tensors the ids point
into are the pool (:class:`PagedKVCache`).
"""

from minivllm.cache.block_allocator import BlockAllocator, OutOfBlocksError
from minivllm.cache.block_table import (PAD_BLOCK, BlockTable, block_table_array, block_tables_tensor, blocks_needed,
                                        decode_slot_mapping, slot_mapping)
from minivllm.cache.kv_cache import (BLOCK_SIZE, KVShape, MemoryBaseline, PagedKVCache, blocks_for_budget,
                                     bytes_per_block, gpu_kv_budget, gpu_memory_baseline)
from minivllm.cache.radix import CacheStats, InsertResult, MatchResult, RadixCache, RadixNode

__all__ = [
    "BLOCK_SIZE",
    "BlockAllocator",
    "BlockTable",
    "KVShape",
    "PAD_BLOCK",
    "CacheStats",
    "InsertResult",
    "MatchResult",
    "OutOfBlocksError",
    "PagedKVCache",
    "RadixCache",
    "RadixNode",
    "block_table_array",
    "block_tables_tensor",
    "blocks_for_budget",
    "blocks_needed",
    "bytes_per_block",
    "decode_slot_mapping",
    "gpu_kv_budget",
    "gpu_memory_baseline",
    "MemoryBaseline",
    "slot_mapping",
]
