"""The block allocator: which KV blocks are free, and how many holders each used block has.

The paged KV cache cuts its memory into ``num_blocks`` blocks of ``block_size`` token slots. This
module only does the bookkeeping, on the CPU: a free list and one reference count per block.
A block is handed out with count 1; every extra holder (a second sequence that shares a prompt, the
radix cache that keeps it for later requests) takes a reference with :meth:`BlockAllocator.ref`, and
:meth:`BlockAllocator.free` drops one. A block goes back on the free list only when its count
reaches zero, so a block shared by several holders is never freed under one of them.

Left out: the KV tensors themselves (the pool), block tables and slot mapping (the sequence's side),
and any choice of *which* cached block to give up (the radix cache's ``evict``).
"""

from collections import Counter, deque
from collections.abc import Iterable


class OutOfBlocksError(RuntimeError):
    """More blocks were asked for than are free (the scheduler asks :meth:`BlockAllocator.can_allocate` first)."""


class BlockAllocator:
    """A free list and reference counts over the block ids ``0 .. num_blocks - 1``.

    Rules:

    * every block is either free (count 0, on the free list) or used (count >= 1), never both;
    * :meth:`allocate` hands out free blocks with count 1, oldest-freed first;
    * :meth:`ref` adds a holder to used blocks; :meth:`free` removes one and returns the blocks whose
      count reached zero, which are free again from then on;
    * freeing a free block (a double free), naming a block that does not exist, or allocating more
      than :attr:`num_free` raises, and then nothing has changed.
    """

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # allocate from the left, free to the right
        self._ref_counts = [0] * num_blocks

    def __repr__(self) -> str:
        return f"BlockAllocator(num_blocks={self.num_blocks}, num_free={self.num_free})"

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        """Whether :meth:`allocate` would succeed for ``n`` blocks (never raises)."""
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; each starts with one reference (the caller's)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(f"cannot allocate {n} blocks: only {len(self._free)} of "
                                   f"{self.num_blocks} are free (evict cached blocks or wait for a sequence to finish)")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def ref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each listed block (a block listed twice gets two); all must be in use."""
        block_ids = list(block_ids)
        self._check_ids(block_ids)
        refs = self._ref_counts
        for b in block_ids:
            if refs[b] == 0:
                raise ValueError(f"block {b} is free: only a block in use can be shared (allocate it first)")
        for b in block_ids:
            refs[b] += 1

    incref = ref

    def free(self, block_ids: Iterable[int]) -> list[int]:
        """Drop one reference from each listed block; return the blocks that became free, in order."""
        counts = Counter(block_ids)  # dicts keep insertion order: blocks come back in the order given
        self._check_ids(counts)
        refs = self._ref_counts
        for b, times in counts.items():
            if times > refs[b]:
                raise ValueError(f"double free: block {b} is already free" if refs[b] == 0 else
                                 f"double free: block {b} is freed {times} times but has {refs[b]} reference(s)")
        freed = []
        for b, times in counts.items():
            refs[b] -= times
            if refs[b] == 0:
                freed.append(b)
        self._free.extend(freed)
        return freed

    def ref_count(self, block_id: int) -> int:
        """How many holders ``block_id`` has (0: it is free)."""
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def _check_id(self, b: int) -> None:
        if not 0 <= b < self.num_blocks:
            raise ValueError(f"block {b} does not exist: this allocator has blocks 0..{self.num_blocks - 1}")

    def _check_ids(self, block_ids: Iterable[int]) -> None:
        if block_ids and (min(block_ids) < 0 or max(block_ids) >= self.num_blocks):  # min/max run in C
            for b in block_ids:
                self._check_id(b)
