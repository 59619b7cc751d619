"""A sequence's KV blocks: what the scheduler asks of the block allocator and the radix cache.

The :class:`~minivllm.scheduler.Scheduler` decides *who* computes *how many* tokens; the
:class:`BlockManager` keeps each sequence's block table in step with that: it serves a cached prefix at
admission (locking its radix node and taking a reference to each block), says how many new tokens fit
(evicting unreferenced cached blocks first), grows tables, and releases them, handing full computed blocks
to the radix cache on the way out.

Reference rules (the :class:`BlockAllocator`'s counts): a live sequence holds one reference to each block of
its table; the radix cache holds its own. So every block is free, held by the radix cache, or held by a live
sequence.

Left out: which sequence gets blocks (the scheduler's policy), swapping blocks to the CPU.
"""

from minivllm.cache import BlockAllocator, RadixCache
from minivllm.sequence import Sequence
from minivllm.utils import cdiv


class BlockManager:
    def __init__(self, allocator: BlockAllocator, cache: RadixCache | None, block_size: int) -> None:
        if cache is not None and cache.block_size != block_size:
            raise ValueError(f"the radix cache's block_size ({cache.block_size}) != config.block_size ({block_size})")
        self.allocator, self.cache, self.block_size = allocator, cache, block_size

    @property
    def num_blocks_used(self) -> int:
        """KV blocks not free: held by sequences or by the radix cache."""
        return self.allocator.num_blocks - self.allocator.num_free

    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Raise ``ValueError`` if a sequence this long could never finish in the whole KV cache."""
        capacity = self.allocator.num_blocks * self.block_size
        need = num_prompt_tokens + (max_tokens - 1 if max_tokens else 0)  # the last sampled token is never cached
        if need > capacity:
            raise ValueError(f"a sequence needs up to {need} KV slots ({num_prompt_tokens} prompt tokens + "
                             f"max_tokens {max_tokens}) but the whole cache holds {capacity}: it could never finish")

    def match_prefix(self, seq: Sequence, max_tokens: int) -> None:
        """Admission: give ``seq`` (holding no blocks) the longest cached prefix of at most ``max_tokens`` tokens."""
        if self.cache is None:
            return
        match = self.cache.match_prefix(seq.token_ids, max_tokens=max_tokens)
        self.cache.lock(match.node)
        self.allocator.ref(match.blocks)
        seq.block_table, seq.radix_node = list(match.blocks), match.node
        seq.num_computed_tokens = seq.num_cached_tokens = match.num_tokens

    def fit(self, seq: Sequence, n: int) -> int:
        """How many of ``n`` new tokens fit in ``seq``'s blocks plus free (or evictable) blocks."""
        bs = self.block_size
        have = len(seq.block_table) * bs - seq.num_computed_tokens
        need_blocks = cdiv(n - have, bs) if n > have else 0
        free = self.allocator.num_free
        if need_blocks > free and self.cache is not None:
            self.cache.evict(need_blocks - free)
            free = self.allocator.num_free
        return min(n, have + free * bs)

    def grow(self, seq: Sequence, n: int) -> None:
        """Allocate the blocks ``n`` more tokens of ``seq`` need (after :meth:`fit` said they fit)."""
        need = cdiv(seq.num_computed_tokens + n, self.block_size) - len(seq.block_table)
        if need > 0:
            seq.block_table += self.allocator.allocate(need)

    def release(self, seq: Sequence, cache_blocks: bool) -> None:
        """Give back every block ``seq`` holds; with ``cache_blocks``, its full computed blocks go to the cache first."""
        table = seq.block_table
        if cache_blocks and self.cache is not None and seq.num_computed_tokens >= self.block_size:
            done = seq.num_computed_tokens
            cached = self.cache.insert(seq.token_ids[:done], table).blocks  # our refs may move to these
            table = cached + table[len(cached):]
        if seq.radix_node is not None:
            self.cache.unlock(seq.radix_node)
        self.allocator.free(table)
        seq.block_table, seq.radix_node = [], None
        seq.num_computed_tokens = 0
