"""The radix-tree prefix cache: requests that share a prompt prefix share its KV blocks.

A radix tree over token ids whose edges hold runs of whole KV blocks (``block_size`` tokens each, 16
by default): the path from the root to a node spells a block-aligned token prefix, and the node's
``blocks`` hold the keys and values of its edge's tokens. A new request looks up its prompt
(:meth:`RadixCache.match_prefix`), reuses the blocks of the longest cached prefix, and computes only
the rest; a sequence's full blocks are added with :meth:`RadixCache.insert` so later requests find them.
Cached blocks nobody uses are given back, least recently used first, by :meth:`RadixCache.evict`.

Left out: partial blocks (the tail of a sequence is still being written, so it is never shared),
the KV tensors (this is bookkeeping over block ids, with a :class:`BlockAllocator`), and the policy of
when to insert and evict (the scheduler's, phase 11).
"""

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from minivllm.cache.block_allocator import BlockAllocator

_ids = itertools.count()


@dataclass(slots=True, eq=False)
class RadixNode:
    """One edge of the tree and the node it leads to. ``key`` is a whole number of blocks of tokens."""

    key: tuple[int, ...]  # the edge's tokens, len(key) == len(blocks) * block_size
    blocks: list[int]  # one KV block per block_size tokens of key
    parent: "RadixNode | None" = field(repr=False)  # None for the root, and for a node that was evicted
    children: dict[tuple[int, ...], "RadixNode"] = field(default_factory=dict, repr=False)  # first block -> child
    lock_ref: int = 0  # running sequences that use this node (a lock counts on the whole path to the root)
    last_used: int = 0  # the cache's clock at the last match or insert through this node
    id: int = field(default_factory=lambda: next(_ids))  # breaks ties in the eviction heap


class MatchResult(NamedTuple):
    blocks: list[int]  # the KV blocks of the matched prefix, in order
    num_tokens: int  # len(blocks) * block_size
    node: RadixNode  # the node the match ends at: lock it while the blocks are in use


class InsertResult(NamedTuple):
    cached_tokens: int  # how many of the inserted tokens were in the cache already
    blocks: list[int]  # the cache's blocks for every full block inserted: the caller maps these now
    node: RadixNode  # the node the inserted prefix ends at


@dataclass(slots=True, frozen=True)
class CacheStats:
    hits: int  # match_prefix calls that found at least one block
    misses: int  # match_prefix calls that found none
    hit_tokens: int  # tokens served from the cache
    query_tokens: int  # tokens asked for (len(tokens) of every match_prefix)
    cached_blocks: int
    evictable_blocks: int
    locked_blocks: int
    evicted_blocks: int  # blocks given back to the allocator by evict

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class RadixCache:
    """Prefix cache over token ids, whose edges are runs of whole KV blocks.

    Who holds what (references are the :class:`BlockAllocator`'s counts):

    * the tree holds one reference to every block it caches; a running sequence holds one reference
      to every block of its block table (``allocator.ref(match.blocks)`` for a cache hit);
    * ``match_prefix`` does not change which blocks are cached (it may split a node and it marks the path
      as used); its result is only safe to use while its node is locked: ``lock(match.node)`` before any
      ``evict`` may run, ``unlock`` after the sequence freed its blocks;
    * ``lock`` counts on every node of the path to the root: a locked node, and its ancestors, are never
      evicted, so a node's ``lock_ref`` is never above its parent's (the root excepted);
    * ``insert`` takes a reference for each new block; for a block already cached under another id, the
      caller's reference moves from its duplicate to the cached block (the duplicate is freed only at
      count zero, so never while another sequence still maps it), and the caller must map
      ``InsertResult.blocks`` from then on;
    * ``evict`` removes whole unlocked leaves, least recently used first, and drops the tree's reference:
      it returns the blocks that became free, at least ``n`` of them unless fewer were evictable. A block
      that a sequence maps without locking it leaves the tree but stays allocated (and is not returned):
      ``evictable_blocks`` is exact while every sequence locks the cached blocks it maps;
    * a block holds one prefix: a sequence that writes into a partial block it shares with a fork copies
      it first (copy on write), so the two never insert one block under two prefixes.

    A prompt that is fully cached must still compute its last token (its logits give the next token):
    match it with ``match_prefix(tokens, max_tokens=len(tokens) - 1)``.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int = 16) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.allocator = allocator
        self.block_size = block_size
        self.root = RadixNode((), [], None)
        self.cached_blocks = self.locked_blocks = 0
        self._clock = 0
        self._num_nodes = 0  # not counting the root
        self._heap: list[tuple[int, int, RadixNode]] = []  # (last_used, id, node): maybe-evictable leaves
        self.hits = self.misses = self.hit_tokens = self.query_tokens = self.evicted_blocks = 0

    @property
    def evictable_blocks(self) -> int:
        return self.cached_blocks - self.locked_blocks  # an unlocked node's whole subtree is unlocked

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.hit_tokens, self.query_tokens, self.cached_blocks,
                          self.evictable_blocks, self.locked_blocks, self.evicted_blocks)

    def match_prefix(self, tokens: Sequence[int], max_tokens: int | None = None) -> MatchResult:
        """The longest cached block-aligned prefix of ``tokens[:max_tokens]``, and its blocks."""
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        if limit < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self._clock += 1
        node, blocks = self._walk(tokens, limit - limit % self.block_size)
        self._push_if_evictable(node)
        if blocks:
            self.hits += 1
        else:
            self.misses += 1
        self.hit_tokens += len(blocks) * self.block_size
        self.query_tokens += len(tokens)
        return MatchResult(blocks, len(blocks) * self.block_size, node)

    def insert(self, tokens: Sequence[int], blocks: Sequence[int]) -> InsertResult:
        """Cache the full blocks of a sequence: ``blocks[i]`` holds ``tokens[i*bs : (i+1)*bs]``."""
        bs = self.block_size
        n = len(tokens) // bs
        if len(blocks) < n:
            raise ValueError(f"{len(tokens)} tokens fill {n} blocks of {bs}, but only {len(blocks)} blocks were given")
        blocks = list(blocks[:n])
        self._clock += 1
        node, cached = self._walk(tokens, n * bs)
        m = len(cached)
        moved = [(c, b) for c, b in zip(cached, blocks) if c != b]
        for _, b in moved:
            if self.allocator.ref_count(b) == 0:
                raise ValueError(f"block {b} is free: insert only blocks the sequence holds")
        if m < n:
            self.allocator.ref(blocks[m:])  # the tree's own reference (raises, changing nothing, on a free block)
        if moved:  # NOTE: the caller's reference moves to the cached block; its duplicate is freed at count 0
            self.allocator.ref([c for c, _ in moved])
            self.allocator.free([b for _, b in moved])
        if m < n:
            leaf = RadixNode(tuple(tokens[m * bs: n * bs]), blocks[m:], node, last_used=self._clock)
            node.children[leaf.key[:bs]] = leaf
            self.cached_blocks += n - m
            self._num_nodes += 1
            node = leaf
        self._push_if_evictable(node)
        return InsertResult(m * bs, cached + blocks[m:], node)

    def lock(self, node: RadixNode) -> None:
        """Protect ``node`` and its ancestors from eviction (once per running sequence that uses them)."""
        self._check_live(node)
        while node is not self.root:
            if node.lock_ref == 0:
                self.locked_blocks += len(node.blocks)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one :meth:`lock` of ``node``."""
        self._check_live(node)
        if node is not self.root and node.lock_ref == 0:
            raise ValueError("unlock of a node that is not locked (each unlock needs an earlier lock)")
        bottom = node
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked_blocks -= len(node.blocks)
            node = node.parent
        self._push_if_evictable(bottom)

    def evict(self, n: int) -> list[int]:
        """Remove unlocked leaves, least recently used first, until ``n`` blocks became free."""
        if n < 0:
            raise ValueError(f"cannot evict a negative number of blocks ({n})")
        freed: list[int] = []
        while len(freed) < n and self._heap:
            last_used, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.children or node.lock_ref or last_used != node.last_used:
                continue  # a stale entry: evicted, no longer a leaf, locked, or used since
            parent = node.parent
            del parent.children[node.key[: self.block_size]]
            node.parent = None
            self._num_nodes -= 1
            self.cached_blocks -= len(node.blocks)
            freed += self.allocator.free(node.blocks)  # blocks a sequence still holds stay allocated
            self._push_if_evictable(parent)
        self.evicted_blocks += len(freed)
        return freed

    def _walk(self, tokens: Sequence[int], n: int) -> tuple[RadixNode, list[int]]:
        """Follow ``tokens[:n]`` (whole blocks) down the tree, splitting the last edge where the match ends.

        Reads only the tokens it matches (plus one block): O(prefix length), whatever the tree's size."""
        bs, node, pos, blocks = self.block_size, self.root, 0, []
        while pos < n:
            child = node.children.get(tuple(tokens[pos: pos + bs]))
            if child is None:
                break
            edge = child.key
            m = min(len(edge), n - pos)
            if edge[:m] != tuple(tokens[pos: pos + m]):  # they part inside the edge: find the block
                m = bs  # the first block matches (it is the dict key)
                while m < len(edge) and pos + m < n and edge[m: m + bs] == tuple(tokens[pos + m: pos + m + bs]):
                    m += bs
            if m < len(edge):
                child = self._split(child, m // bs)
            child.last_used = self._clock
            blocks += child.blocks
            node, pos = child, pos + m
        return node, blocks

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Cut ``node``'s edge after ``k`` blocks; return the new upper node (``node`` stays the lower part)."""
        assert 0 < k < len(node.blocks)
        bs = self.block_size
        upper = RadixNode(node.key[: k * bs], node.blocks[:k], node.parent, lock_ref=node.lock_ref,
                          last_used=node.last_used)
        upper.parent.children[upper.key[:bs]] = upper
        node.key, node.blocks, node.parent = node.key[k * bs:], node.blocks[k:], upper
        upper.children[node.key[:bs]] = node
        self._num_nodes += 1
        return upper

    def _push_if_evictable(self, node: RadixNode) -> None:
        if node is self.root or node.children or node.lock_ref:
            return
        heapq.heappush(self._heap, (node.last_used, node.id, node))
        if len(self._heap) > 4 * self._num_nodes + 1024:  # too many stale entries: rebuild
            self._heap = [(x.last_used, x.id, x) for x in self._nodes() if not x.children and not x.lock_ref]
            heapq.heapify(self._heap)

    def _nodes(self) -> Iterator[RadixNode]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _check_live(self, node: RadixNode) -> None:
        if node.parent is None and node is not self.root:
            raise ValueError("this node was evicted: lock the result of a match before anything can evict it")
