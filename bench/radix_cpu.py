"""Phase 09 on the CPU: how fast the radix cache's operations are, with 10k cached sequences of 1k tokens.

    python -m bench.radix_cpu                      # saves bench/results/09_radix_cpu.json
    python -m bench.radix_cpu --sequences 1000     # a quicker run

The workload: every sequence starts with one of 64 shared "system prompts" (384 tokens), then has
640 tokens of its own (random ids below Qwen3's vocabulary size), block size 16. Times are per call,
wall clock, one Python thread; the RadixCache is pure Python, so this measures the interpreter too.
``match_prefix`` and ``insert`` cost O(prefix length): the ``scaling`` tables show the time per match
staying flat as the tree grows, and growing with the prefix matched.
"""

import argparse
import platform
import random
import sys
import time
from pathlib import Path

from bench._harness import RESULTS, save
from minivllm.cache import BlockAllocator, RadixCache
from minivllm.utils import cdiv

BLOCK, VOCAB, SYSTEMS, SYSTEM_TOKENS = 16, 151_936, 64, 384


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _timed(calls) -> float:
    """Seconds per call of each zero-argument callable in ``calls`` (run once each, in order)."""
    t0 = time.perf_counter()
    for call in calls:
        call()
    return (time.perf_counter() - t0) / max(len(calls), 1)


def _best(call, number: int = 200, repeat: int = 5) -> float:
    """Seconds per call of ``call``: the best of ``repeat`` batches (as timeit does, to skip noise)."""
    return min(_timed([call] * number) for _ in range(repeat))


def run(sequences: int = 10_000, tokens: int = 1024) -> dict:
    rng = random.Random(0)
    systems = [_tokens(rng, SYSTEM_TOKENS) for _ in range(SYSTEMS)]
    seqs = [systems[i % SYSTEMS] + _tokens(rng, tokens - SYSTEM_TOKENS) for i in range(sequences)]
    blocks_per_seq = cdiv(tokens, BLOCK)
    allocator = BlockAllocator(sequences * blocks_per_seq + 1024)
    cache = RadixCache(allocator, block_size=BLOCK)
    us: dict[str, float] = {}
    checkpoints = sorted({c for c in (sequences // 10, sequences // 4, sequences // 2, sequences) if c})
    flat = {"cached_sequences": [], "match_us": []}

    # insert: each sequence ran to completion; its blocks go into the tree, then the sequence lets go
    t_insert, done = 0.0, 0
    for c in checkpoints:
        for s in seqs[done:c]:
            table = allocator.allocate(blocks_per_seq)
            t0 = time.perf_counter()
            r = cache.insert(s, table)
            t_insert += time.perf_counter() - t0
            allocator.free(r.blocks)
        done = c
        sample = [seqs[rng.randrange(done)] for _ in range(200)]
        flat["cached_sequences"].append(done)
        flat["match_us"].append(round(1e6 * min(_timed([lambda s=s: cache.match_prefix(s) for s in sample])
                                                for _ in range(5)), 2))
    us[f"insert ({tokens} tokens, {SYSTEM_TOKENS} already cached)"] = 1e6 * t_insert / sequences

    order = rng.sample(seqs, len(seqs))
    us[f"match_prefix, hit ({tokens} tokens cached)"] = 1e6 * _timed([lambda s=s: cache.match_prefix(s) for s in order])
    fresh = [systems[i % SYSTEMS] + _tokens(rng, tokens - SYSTEM_TOKENS) for i in range(min(sequences, 2000))]
    us[f"match_prefix, new request ({SYSTEM_TOKENS} of {tokens} tokens cached)"] = 1e6 * _timed(
        [lambda s=s: cache.match_prefix(s) for s in fresh])
    us["match_prefix, miss (first block unknown)"] = 1e6 * _timed(
        [lambda s=s: cache.match_prefix(s) for s in (_tokens(rng, tokens) for _ in range(2000))])
    us["match_prefix, all cached, max_tokens=len-1 (splits)"] = 1e6 * _timed(
        [lambda s=s: cache.match_prefix(s, max_tokens=len(s) - 1) for s in order])
    nodes = [cache.match_prefix(s).node for s in order[:5000]]
    us["lock + unlock (a path of 3 nodes)"] = 1e6 * _timed(
        [lambda n=n: (cache.lock(n), cache.unlock(n)) for n in nodes])

    evicted, t0, calls = 0, time.perf_counter(), 0
    while cache.evictable_blocks:
        evicted += len(cache.evict(blocks_per_seq))
        calls += 1
    us[f"evict({blocks_per_seq} blocks)"] = 1e6 * (time.perf_counter() - t0) / calls
    assert evicted == cache.evicted_blocks and allocator.num_free == allocator.num_blocks

    # O(prefix length): one long sequence, matched at growing lengths
    long_cache = RadixCache(BlockAllocator(1024), block_size=BLOCK)
    long_seq = _tokens(rng, 8192)
    long_cache.insert(long_seq, long_cache.allocator.allocate(512))
    lengths = [256, 1024, 4096, 8192]
    prefixes = [long_seq[:n] for n in lengths]
    for p in prefixes:  # split the edge at every length first, so the timed calls only walk
        long_cache.match_prefix(p)
    by_length = {"tokens": lengths, "match_us": [
        round(1e6 * _best(lambda p=p: long_cache.match_prefix(p)), 2) for p in prefixes]}

    return {
        "cpu": _cpu(),
        "workload": {"sequences": sequences, "tokens_per_sequence": tokens, "block_size": BLOCK,
                     "shared_prefixes": SYSTEMS, "shared_prefix_tokens": SYSTEM_TOKENS,
                     "cached_blocks_at_peak": sequences * (blocks_per_seq - SYSTEM_TOKENS // BLOCK)
                     + SYSTEMS * (SYSTEM_TOKENS // BLOCK)},
        "us_per_op": {k: round(v, 2) for k, v in us.items()},
        "ops_per_s": {k: round(1e6 / v) for k, v in us.items()},
        "scaling_with_tree_size": flat,
        "scaling_with_prefix_length": by_length,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    data = run(args.sequences, args.tokens)
    for name, v in data["us_per_op"].items():
        print(f"{v:9.2f} µs  {data['ops_per_s'][name]:>9,} ops/s  {name}")
    print("match µs vs cached sequences:", dict(zip(*data["scaling_with_tree_size"].values())))
    print("match µs vs prefix tokens:   ", dict(zip(*data["scaling_with_prefix_length"].values())))
    print(f"saved {save('09_radix_cpu', data, args.out)} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
