"""Block tables and slot mapping: where each token of each sequence lives in the paged KV cache.

A sequence's **block table** lists the physical blocks that hold its tokens, in order: token ``p`` of
the sequence is in block ``table[p // block_size]`` at offset ``p % block_size``, i.e. in **slot**

    slot = table[p // block_size] * block_size + p % block_size

The blocks need not be adjacent or in order; that is the point of paging. :class:`BlockTable` grows a
sequence's table through a :class:`BlockAllocator` one block at a time, so a sequence never holds more
than ``block_size - 1`` unused slots. :func:`token_slots` is the formula for a run of tokens (the
scheduler's slot mapping). For a batch, :func:`block_table_array` / :func:`block_tables_tensor` pad the
tables into one int32 array (the decode kernel's input; padding is :data:`PAD_BLOCK`, never read: every
read stops at the sequence's context length) and :func:`slot_mapping` computes every new token's slot with
tensor ops (the KV-store kernel's input); a padding position ``-1`` gets slot ``-1`` (skip).

Left out: sharing blocks between sequences (the radix cache takes references through the allocator),
and any choice of which sequence to preempt when blocks run out (the scheduler's).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from minivllm.cache.block_allocator import BlockAllocator
from minivllm.utils import cdiv

PAD_BLOCK = -1  # the value past the end of a shorter sequence's table (the one padding value)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
    if num_tokens < 0 or block_size <= 0:
        raise ValueError(f"need num_tokens >= 0 and block_size > 0, got {num_tokens}, {block_size}")
    return cdiv(num_tokens, block_size)


def token_slots(block_ids: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of tokens ``start .. end - 1`` of a sequence with this table: ``table[p // bs] * bs + p % bs``."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass(slots=True)
class BlockTable:
    """One sequence's blocks, in token order, and how many tokens they hold."""

    block_size: int
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if blocks_needed(self.num_tokens, self.block_size) > len(self.block_ids):
            raise ValueError(f"{len(self.block_ids)} blocks cannot hold {self.num_tokens} tokens")

    def blocks_to_grow(self, num_new_tokens: int) -> int:
        """How many more blocks :meth:`grow` would allocate for ``num_new_tokens`` more tokens."""
        return max(0, blocks_needed(self.num_tokens + num_new_tokens, self.block_size) - len(self.block_ids))

    def grow(self, num_new_tokens: int, allocator: BlockAllocator) -> list[int]:
        """Make room for ``num_new_tokens`` more tokens; return the newly allocated blocks.

        Raises ``OutOfBlocksError`` (nothing changed) when the allocator has too few free blocks.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be non-negative, got {num_new_tokens}")
        new = allocator.allocate(self.blocks_to_grow(num_new_tokens))
        self.block_ids.extend(new)
        self.num_tokens += num_new_tokens
        return new

    def slots(self, start: int, end: int) -> list[int]:
        """Slots of tokens ``start .. end - 1`` (they must be within the table)."""
        if not 0 <= start <= end <= len(self.block_ids) * self.block_size:
            raise ValueError(f"tokens {start}..{end - 1} are outside a table of {len(self.block_ids)} blocks")
        return token_slots(self.block_ids, start, end, self.block_size)

    def release(self, allocator: BlockAllocator) -> list[int]:
        """Drop this sequence's reference to all its blocks; return those that became free."""
        freed = allocator.free(self.block_ids)
        self.block_ids, self.num_tokens = [], 0
        return freed


def block_table_array(tables: Sequence[Sequence[int]], *, rows: int | None = None, width: int | None = None,
                      pad: int = PAD_BLOCK) -> np.ndarray:
    """The tables of a batch as one (rows, width) int32 array, shorter rows (and rows past the tables) padded.

    ``rows`` defaults to ``len(tables)`` and ``width`` to the longest table (a CUDA graph wants fixed sizes).
    """
    longest = max((len(t) for t in tables), default=0)
    width = longest if width is None else width
    rows = len(tables) if rows is None else rows
    if width < longest:
        raise ValueError(f"width {width} is smaller than the longest block table ({longest} blocks)")
    if rows < len(tables):
        raise ValueError(f"rows {rows} is fewer than the {len(tables)} block tables")
    out = np.full((rows, width), pad, dtype=np.int32)
    for row, table in enumerate(tables):  # one row per sequence: a copy, not a loop over tokens
        out[row, :len(table)] = table
    return out


def block_tables_tensor(tables: Sequence[Sequence[int]], *, device: torch.device | str = "cpu",
                        pad: int = PAD_BLOCK, width: int | None = None) -> torch.Tensor:
    """:func:`block_table_array` as a (batch, width) int32 tensor on ``device``."""
    return torch.from_numpy(block_table_array(tables, width=width, pad=pad)).to(device)


def slot_mapping(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int,
                 seq_index: torch.Tensor | None = None) -> torch.Tensor:
    """Slots (int64) of tokens at ``positions`` of the sequences ``seq_index`` (rows of ``block_tables``).

    ``block_tables``: (batch, width) int32, or (width,) for one sequence (then ``seq_index`` is not
    needed). ``positions``: (tokens,); a negative position is padding and maps to slot -1.
    Raises if a token's block is past its table or is padding.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if block_tables.dim() == 1:
        block_tables = block_tables.unsqueeze(0)
        seq_index = torch.zeros_like(positions) if seq_index is None else seq_index
    if block_tables.dim() != 2 or positions.dim() != 1:
        raise ValueError(f"need block_tables (batch, width) and positions (tokens,), got "
                         f"{tuple(block_tables.shape)} and {tuple(positions.shape)}")
    if seq_index is None:
        raise ValueError("seq_index (the batch row of each token) is needed for a batch of block tables")
    if seq_index.shape != positions.shape:
        raise ValueError(f"seq_index {tuple(seq_index.shape)} and positions {tuple(positions.shape)} differ")
    if len(seq_index) and (seq_index.min() < 0 or seq_index.max() >= block_tables.shape[0]):
        raise ValueError(f"seq_index must be in 0..{block_tables.shape[0] - 1}")
    valid = positions >= 0
    pos = positions.clamp(min=0).long()
    col = pos // block_size  # (tokens,)
    if bool((valid & (col >= block_tables.shape[1])).any()):
        raise ValueError(f"a position is past its block table ({block_tables.shape[1]} blocks of {block_size})")
    block = block_tables[seq_index.long(), col.clamp(max=max(block_tables.shape[1] - 1, 0))].long()
    if bool((valid & (block < 0)).any()):
        raise ValueError("a position falls in a padding entry of its block table (allocate its block first)")
    slots = block * block_size + pos % block_size
    return torch.where(valid, slots, torch.full_like(slots, -1))


def decode_slot_mapping(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slots of each sequence's newest token (position ``context_len - 1``): the decode step's slot mapping."""
    seq_index = torch.arange(block_tables.shape[0], device=block_tables.device)
    return slot_mapping(block_tables, context_lens.long() - 1, block_size, seq_index)
