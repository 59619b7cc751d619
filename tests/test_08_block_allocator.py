"""BlockAllocator (minivllm.cache): free list and reference counts, against a dict-of-counts model."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from minivllm.cache import BlockAllocator, OutOfBlocksError


def test_allocate_hands_out_distinct_blocks_until_none_are_left():
    a = BlockAllocator(5)
    assert a.allocate(0) == []
    got = a.allocate(3) + a.allocate(2)
    assert sorted(got) == [0, 1, 2, 3, 4] and a.num_free == 0 and a.num_used == 5
    assert all(a.ref_count(b) == 1 for b in got)
    assert a.can_allocate(0) and not a.can_allocate(1)
    with pytest.raises(OutOfBlocksError, match="cannot allocate 1 blocks: only 0 of 5 are free"):
        a.allocate(1)


def test_a_shared_block_is_freed_only_when_its_last_holder_frees_it():
    a = BlockAllocator(4)
    b = a.allocate(2)
    a.ref(b[:1])  # a second sequence shares the first block
    assert a.ref_count(b[0]) == 2
    assert a.free(b) == [b[1]]  # the first holder leaves: only the unshared block comes back
    assert a.num_free == 3 and a.ref_count(b[0]) == 1
    assert a.free(b[:1]) == [b[0]]
    assert a.num_free == 4


def test_freed_blocks_are_handed_out_again_oldest_freed_first():
    a = BlockAllocator(3)
    x, y, z = a.allocate(3)
    a.free([y])
    a.free([x])
    assert a.allocate(2) == [y, x]


def test_errors_are_clear_and_leave_the_state_unchanged():
    a = BlockAllocator(4)
    b = a.allocate(2)
    with pytest.raises(ValueError, match="double free: block 2 is already free"):
        a.free([b[0], 2])
    assert a.ref_count(b[0]) == 1  # the valid part of the failed call did not happen
    with pytest.raises(ValueError, match=r"freed 2 times but has 1 reference"):
        a.free([b[1], b[1]])
    with pytest.raises(ValueError, match=r"block 7 does not exist: this allocator has blocks 0..3"):
        a.free([7])
    with pytest.raises(ValueError, match="does not exist"):
        a.ref_count(-1)
    with pytest.raises(ValueError, match="block 3 is free"):
        a.ref([b[0], 3])
    assert a.ref_count(b[0]) == 1
    with pytest.raises(ValueError, match="negative"):
        a.allocate(-1)
    assert not a.can_allocate(-1)
    with pytest.raises(ValueError, match="positive"):
        BlockAllocator(0)
    assert a.num_free == 2


def test_incref_is_ref_and_listing_a_block_twice_counts_twice():
    a = BlockAllocator(2)
    (b,) = a.allocate(1)
    a.incref([b, b])
    assert a.ref_count(b) == 3
    assert a.free([b, b]) == [] and a.free([b]) == [b]


class AllocatorModel(RuleBasedStateMachine):
    """Random allocate/ref/free against a dict of counts; errors must match the model's expectation."""

    def __init__(self):
        super().__init__()
        self.n = 6
        self.a = BlockAllocator(self.n)
        self.counts = {b: 0 for b in range(self.n)}

    @rule(k=st.integers(0, 8))
    def allocate(self, k):
        free = [b for b, c in self.counts.items() if c == 0]
        assert self.a.can_allocate(k) == (k <= len(free))
        if k > len(free):
            with pytest.raises(OutOfBlocksError):
                self.a.allocate(k)
            return
        got = self.a.allocate(k)
        assert len(set(got)) == k and all(self.counts[b] == 0 for b in got)
        for b in got:
            self.counts[b] = 1

    @rule(blocks=st.lists(st.integers(0, 5), max_size=4))
    def ref(self, blocks):
        if any(self.counts[b] == 0 for b in blocks):
            with pytest.raises(ValueError, match="is free"):
                self.a.ref(blocks)
            return
        self.a.ref(blocks)
        for b in blocks:
            self.counts[b] += 1

    @rule(blocks=st.lists(st.integers(-1, 6), max_size=4))
    def free(self, blocks):
        if any(not 0 <= b < self.n for b in blocks):
            with pytest.raises(ValueError, match="does not exist"):
                self.a.free(blocks)
            return
        if any(blocks.count(b) > self.counts[b] for b in blocks):
            with pytest.raises(ValueError, match="double free"):
                self.a.free(blocks)
            return
        freed = self.a.free(blocks)
        for b in blocks:
            self.counts[b] -= 1
        assert sorted(freed) == sorted({b for b in blocks if self.counts[b] == 0})

    @invariant()
    def counts_match_the_model(self):
        assert [self.a.ref_count(b) for b in range(self.n)] == [self.counts[b] for b in range(self.n)]
        assert self.a.num_free == sum(c == 0 for c in self.counts.values())


TestAllocatorModel = AllocatorModel.TestCase
TestAllocatorModel.settings = settings(max_examples=300, stateful_step_count=30, deadline=None, database=None)
