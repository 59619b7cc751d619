"""RadixCache (minivllm.cache.radix): unit tests per operation, then random runs against a brute-force model.

The model is a dict from every cached block-aligned prefix (a tuple of tokens) to its block, plus the
last time each prefix was used: a match is the longest prefix in the dict, eviction removes prefixes.
"""

import math
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minivllm.cache import BlockAllocator, RadixCache


def make(num_blocks=64, block_size=2):
    allocator = BlockAllocator(num_blocks)
    return allocator, RadixCache(allocator, block_size=block_size)


def finished(cache, tokens):
    """A sequence that ran to completion: its blocks allocated, inserted, then freed by the sequence."""
    table = cache.allocator.allocate(math.ceil(len(tokens) / cache.block_size))
    result = cache.insert(tokens, table)
    cache.allocator.free(result.blocks + table[len(result.blocks):])
    return result


def contents(cache) -> dict[tuple, int]:
    """Every cached block-aligned prefix and its block, read from the tree."""
    out, stack = {}, [((), cache.root)]
    while stack:
        prefix, node = stack.pop()
        for first, child in node.children.items():
            assert child.key[: cache.block_size] == first and child.parent is node
            assert len(child.key) == len(child.blocks) * cache.block_size > 0
            assert child.lock_ref <= node.lock_ref or node is cache.root
            for i, b in enumerate(child.blocks):
                out[prefix + child.key[: (i + 1) * cache.block_size]] = b
            stack.append((prefix + child.key, child))
    return out


# ----------------------------------------------------------------------------- unit tests
def test_an_empty_cache_matches_nothing_and_counts_a_miss():
    _, cache = make()
    m = cache.match_prefix([1, 2, 3])
    assert m.blocks == [] and m.num_tokens == 0 and m.node is cache.root
    assert cache.match_prefix([]).blocks == []
    s = cache.stats()
    assert (s.hits, s.misses, s.hit_tokens, s.query_tokens, s.cached_blocks) == (0, 2, 0, 3, 0)


def test_only_full_blocks_are_cached_and_matched():
    allocator, cache = make(block_size=4)
    r = finished(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # 2 full blocks + 2 tokens still being written
    assert r.cached_tokens == 0 and len(r.blocks) == 2 and cache.cached_blocks == 2
    assert allocator.num_used == 2  # the partial block went back to the allocator
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).num_tokens == 8  # exact block boundary
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).num_tokens == 8
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).num_tokens == 4  # one token short of a boundary
    assert cache.match_prefix([1, 2, 3]).num_tokens == 0  # shorter than a block
    assert cache.match_prefix([1, 2, 3, 9, 5, 6, 7, 8]).num_tokens == 0  # differs inside the first block
    assert finished(cache, [1, 2, 3]).blocks == [] and cache.cached_blocks == 2  # less than a block: nothing


def test_a_fully_cached_prompt_keeps_its_last_token_to_compute_with_max_tokens():
    _, cache = make(block_size=4)
    prompt = list(range(8))
    finished(cache, prompt)
    assert cache.match_prefix(prompt).num_tokens == 8  # everything: the prefill would have no query left
    m = cache.match_prefix(prompt, max_tokens=len(prompt) - 1)
    assert m.num_tokens == 4 and len(m.blocks) == 1  # the last block is recomputed, last token included
    assert cache.match_prefix(prompt + [8], max_tokens=8).num_tokens == 8  # unaligned prompt: nothing lost
    assert cache.match_prefix(prompt, max_tokens=0).num_tokens == 0
    with pytest.raises(ValueError, match="max_tokens"):
        cache.match_prefix([], max_tokens=-1)


def test_divergence_inside_an_edge_splits_it_and_shares_the_common_blocks():
    allocator, cache = make()
    a = finished(cache, [1, 1, 2, 2, 3, 3, 4, 4])  # one edge of 4 blocks
    assert len(cache.root.children) == 1
    b = finished(cache, [1, 1, 2, 2, 7, 7])
    assert b.cached_tokens == 4 and b.blocks[:2] == a.blocks[:2] and b.blocks[2] not in a.blocks
    (top,) = cache.root.children.values()
    assert top.key == (1, 1, 2, 2) and top.blocks == a.blocks[:2]
    assert {c.key for c in top.children.values()} == {(3, 3, 4, 4), (7, 7)}
    assert cache.cached_blocks == 5 and allocator.num_used == 5
    assert contents(cache) == {(1, 1): a.blocks[0], (1, 1, 2, 2): a.blocks[1], (1, 1, 2, 2, 3, 3): a.blocks[2],
                               (1, 1, 2, 2, 3, 3, 4, 4): a.blocks[3], (1, 1, 2, 2, 7, 7): b.blocks[2]}
    m = cache.match_prefix([1, 1, 2, 2, 3, 3, 9, 9])  # a match that ends inside an edge splits it too
    assert m.blocks == a.blocks[:3] and m.node.key == (3, 3) and len(m.node.children) == 1


def test_insert_of_a_cached_prefix_moves_the_callers_reference_to_the_cached_block():
    allocator, cache = make()
    tokens = [5, 5, 6, 6, 7]
    first = finished(cache, tokens)
    table = allocator.allocate(3)  # a second request computed the same prompt in its own blocks
    r = cache.insert(tokens, table)
    assert r.cached_tokens == 4 and r.blocks == first.blocks  # map the cached blocks from now on
    assert [allocator.ref_count(b) for b in table[:2]] == [0, 0]  # its duplicates went back
    assert [allocator.ref_count(b) for b in first.blocks] == [2, 2]  # the tree and the sequence
    assert cache.cached_blocks == 2


def test_a_duplicate_still_mapped_by_another_sequence_is_not_freed():
    allocator, cache = make()
    tokens = [5, 5, 6, 6]
    cached = finished(cache, tokens).blocks
    table = allocator.allocate(2)
    allocator.ref(table)  # a fork (parallel sampling) maps the same blocks
    r = cache.insert(tokens, table)
    assert r.blocks == cached
    assert [allocator.ref_count(b) for b in table] == [1, 1]  # the fork still holds its blocks
    assert allocator.free(table) == table  # and they are freed when it lets go


def test_insert_refuses_too_few_blocks_and_blocks_it_does_not_hold():
    allocator, cache = make()
    with pytest.raises(ValueError, match="fill 2 blocks of 2, but only 1"):
        cache.insert([1, 2, 3, 4], allocator.allocate(1))
    with pytest.raises(ValueError, match="block 40 is free"):
        cache.insert([1, 2], [40])
    assert cache.cached_blocks == 0
    with pytest.raises(ValueError, match="block_size"):
        RadixCache(allocator, block_size=0)


def test_evict_frees_least_recently_used_leaves_first_and_at_least_n_blocks():
    allocator, cache = make()
    a = finished(cache, [1, 1, 2, 2])
    b = finished(cache, [3, 3, 4, 4])
    c = finished(cache, [5, 5])
    cache.match_prefix([1, 1, 2, 2])  # a is now the most recently used
    assert sorted(cache.evict(1)) == sorted(b.blocks)  # whole leaves: 2 blocks for n = 1
    assert cache.evict(1) == c.blocks
    assert cache.evict(0) == [] and cache.cached_blocks == 2
    assert sorted(cache.evict(10)) == sorted(a.blocks)  # fewer than asked: everything evictable
    assert cache.cached_blocks == 0 and allocator.num_free == allocator.num_blocks
    assert cache.stats().evicted_blocks == 5
    with pytest.raises(ValueError, match="negative"):
        cache.evict(-1)


def test_a_parent_becomes_evictable_when_its_children_are_gone():
    _, cache = make()
    finished(cache, [1, 1, 2, 2])
    finished(cache, [1, 1, 3, 3])  # split: (1,1) -> {(2,2), (3,3)}
    assert sorted(len(cache.evict(1)) for _ in range(3)) == [1, 1, 1]
    assert cache.cached_blocks == 0 and cache.root.children == {}


def test_lock_protects_the_path_and_unlock_releases_it():
    allocator, cache = make()
    finished(cache, [1, 1, 2, 2, 3, 3])
    finished(cache, [9, 9])
    m = cache.match_prefix([1, 1, 2, 2, 3, 3], max_tokens=5)  # 2 of the 3 blocks: the edge is split
    cache.lock(m.node)
    allocator.ref(m.blocks)
    assert (cache.locked_blocks, cache.evictable_blocks) == (2, 2)
    freed = cache.evict(10)
    assert len(freed) == 2 and not set(freed) & set(m.blocks)  # the (3,3) leaf and (9,9)
    assert cache.match_prefix([1, 1, 2, 2]).blocks == m.blocks
    cache.unlock(m.node)
    assert cache.evictable_blocks == 2
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(m.node)
    allocator.free(m.blocks)
    assert cache.evict(2) == m.blocks
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(m.node)


def test_locks_count_one_per_sequence():
    _, cache = make()
    r = finished(cache, [1, 1, 2, 2])
    cache.lock(r.node)
    cache.lock(r.node)
    cache.unlock(r.node)
    assert cache.evict(4) == [] and cache.locked_blocks == 2
    cache.unlock(r.node)
    assert len(cache.evict(4)) == 2


def test_counters_of_hits_misses_and_tokens():
    _, cache = make(block_size=4)
    finished(cache, list(range(12)))
    cache.match_prefix(list(range(10)))
    cache.match_prefix([7] * 10)
    s = cache.stats()
    assert (s.hits, s.misses, s.hit_tokens, s.query_tokens) == (1, 1, 8, 20)
    assert s.token_hit_rate == pytest.approx(0.4)
    assert (s.cached_blocks, s.evictable_blocks, s.locked_blocks) == (3, 3, 0)


def test_many_matches_of_one_leaf_keep_eviction_correct_when_the_heap_is_rebuilt():
    _, cache = make()
    a = finished(cache, [1, 1])
    b = finished(cache, [2, 2])
    for _ in range(1500):  # every match pushes a heap entry; stale ones are compacted away
        cache.match_prefix([1, 1])
    assert len(cache._heap) < 1100
    assert cache.evict(1) == b.blocks and cache.evict(1) == a.blocks


# ----------------------------------------------------------------------------- against a brute-force model
@dataclass
class Seq:
    tokens: list[int]
    table: list[int]  # the blocks it holds a reference to
    node: object  # the node it locked
    locked: tuple  # the prefix that lock protects


class RadixModel(RuleBasedStateMachine):
    """Requests start (match, lock, allocate), grow, insert, fork and finish; evictions make room."""

    @initialize(block_size=st.sampled_from([1, 2, 3]), num_blocks=st.integers(6, 16))
    def setup(self, block_size, num_blocks):
        self.bs = block_size
        self.allocator, self.cache = make(num_blocks, block_size)
        self.cached: dict[tuple, int] = {}  # prefix -> block
        self.used: dict[tuple, int] = {}  # prefix -> clock of its last use
        self.clock = 0
        self.seqs: list[Seq] = []
        self.prompts: list[list[int]] = []
        self.matches = self.hits = 0

    # -- the model
    def longest(self, tokens, limit):
        k = 0
        while (k + 1) * self.bs <= limit and tuple(tokens[: (k + 1) * self.bs]) in self.cached:
            k += 1
        return k

    def locked(self, prefix):
        return any(s.locked[: len(prefix)] == prefix for s in self.seqs if len(s.locked) >= len(prefix))

    def check_match(self, tokens, m, limit):
        self.clock += 1
        k = self.longest(tokens, limit)
        want = [self.cached[tuple(tokens[: (i + 1) * self.bs])] for i in range(k)]
        assert m.blocks == want and m.num_tokens == k * self.bs, "not the longest cached prefix"
        for i in range(k):
            self.used[tuple(tokens[: (i + 1) * self.bs])] = self.clock
        self.matches += 1
        self.hits += k > 0

    def do_evict(self, n):
        before = {b for b in range(self.allocator.num_blocks) if self.allocator.ref_count(b) == 0}
        unlocked = [p for p in self.cached if not self.locked(p)]
        assert self.cache.evictable_blocks == len(unlocked)
        # a fork maps its sibling's blocks without a lock on them once the sibling inserted them:
        # evicting those drops them from the tree but frees nothing
        tree_only = sum(self.allocator.ref_count(self.cached[p]) == 1 for p in unlocked)
        freed = self.cache.evict(n)
        after = {b for b in range(self.allocator.num_blocks) if self.allocator.ref_count(b) == 0}
        assert len(freed) == len(set(freed)) and set(freed) == after - before, "reported != freed"
        assert len(freed) >= min(n, tree_only)
        remaining = contents(self.cache)
        assert remaining.items() <= self.cached.items()
        gone = [p for p in self.cached if p not in remaining]
        assert set(freed) == {self.cached[p] for p in gone if self.allocator.ref_count(self.cached[p]) == 0}
        assert not any(self.locked(p) for p in gone), "a locked block was evicted"
        for p in gone:
            del self.cached[p]
        leaves = [p for p in self.cached if not self.locked(p)
                  and not any(len(q) > len(p) and q[: len(p)] == p for q in self.cached)]
        if gone and leaves:
            assert max(self.used[p] for p in gone) <= min(self.used[p] for p in leaves), "not LRU"
        return freed

    def make_room(self, need):
        short = need - self.allocator.num_free
        if short > 0 and self.cache.evictable_blocks >= short:
            self.do_evict(short)
        return self.allocator.can_allocate(need)

    def prompt(self, data):
        tokens = data.draw(st.lists(st.integers(0, 1), max_size=8), label="suffix")
        if self.prompts and data.draw(st.booleans(), label="share"):
            base = data.draw(st.sampled_from(self.prompts), label="base")
            tokens = base[: data.draw(st.integers(0, len(base)), label="cut")] + tokens
        return tokens

    # -- the rules
    @rule(data=st.data())
    def start(self, data):
        tokens = self.prompt(data) or [0]
        self.prompts.append(tokens)
        m = self.cache.match_prefix(tokens, max_tokens=len(tokens) - 1)
        self.check_match(tokens, m, len(tokens) - 1)
        assert m.num_tokens < len(tokens)  # the last token is always computed
        self.cache.lock(m.node)
        self.allocator.ref(m.blocks)
        seq = Seq(tokens, list(m.blocks), m.node, tuple(tokens[: m.num_tokens]))
        self.seqs.append(seq)
        need = math.ceil(len(tokens) / self.bs) - len(m.blocks)
        if not self.make_room(need):  # no memory: the request waits (gives everything back)
            self.finish_seq(seq)
            return
        seq.table += self.allocator.allocate(need)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99), token=st.integers(0, 1))
    def grow(self, i, token):
        seq = self.seqs[i % len(self.seqs)]
        if len(seq.tokens) == len(seq.table) * self.bs:  # the last block is full: take a new one
            if not self.make_room(1):
                return
            seq.table += self.allocator.allocate(1)
        elif self.allocator.ref_count(seq.table[-1]) > 1:  # a fork shares the partial block: copy on write
            if not self.make_room(1):
                return
            self.allocator.free(seq.table[-1:])
            seq.table[-1:] = self.allocator.allocate(1)
        seq.tokens.append(token)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def insert(self, i):
        seq = self.seqs[i % len(self.seqs)]
        r = self.cache.insert(seq.tokens, seq.table)
        self.clock += 1
        n = len(seq.tokens) // self.bs
        cached_before = self.longest(seq.tokens, n * self.bs)
        for k in range(n):
            p = tuple(seq.tokens[: (k + 1) * self.bs])
            self.cached.setdefault(p, seq.table[k])
            self.used[p] = self.clock
        assert r.cached_tokens == cached_before * self.bs
        assert r.blocks == [self.cached[tuple(seq.tokens[: (k + 1) * self.bs])] for k in range(n)]
        seq.table[:n] = r.blocks
        self.cache.lock(r.node)
        self.cache.unlock(seq.node)
        seq.node, seq.locked = r.node, tuple(seq.tokens[: n * self.bs])

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def fork(self, i):
        seq = self.seqs[i % len(self.seqs)]
        self.allocator.ref(seq.table)
        self.cache.lock(seq.node)
        self.seqs.append(Seq(list(seq.tokens), list(seq.table), seq.node, seq.locked))

    def finish_seq(self, seq):
        self.cache.unlock(seq.node)
        self.allocator.free(seq.table)
        self.seqs.remove(seq)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 99))
    def finish(self, i):
        self.finish_seq(self.seqs[i % len(self.seqs)])

    @rule(data=st.data())
    def match(self, data):
        tokens = self.prompt(data)
        self.check_match(tokens, self.cache.match_prefix(tokens), len(tokens))

    @rule(n=st.integers(0, 3))
    def evict(self, n):
        self.do_evict(n)

    # -- after every step
    @invariant()
    def tree_allocator_and_sequences_agree(self):
        assert contents(self.cache) == self.cached
        tree = set(self.cached.values())
        assert len(tree) == len(self.cached)  # a block is cached at one place only
        for b in range(self.allocator.num_blocks):  # free, or held by the tree and/or sequences
            holders = (b in tree) + sum(s.table.count(b) for s in self.seqs)
            assert self.allocator.ref_count(b) == holders, f"block {b}"
        assert self.cache.cached_blocks == len(self.cached)
        assert self.cache.locked_blocks == sum(self.locked(p) for p in self.cached)
        s = self.cache.stats()
        assert (s.hits, s.hits + s.misses) == (self.hits, self.matches)


TestRadixModel = RadixModel.TestCase
TestRadixModel.settings = settings(max_examples=300, stateful_step_count=50, deadline=None, database=None)
