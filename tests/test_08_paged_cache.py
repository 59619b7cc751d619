"""The paged KV cache's pure-torch side and the KV-store kernel, against brute-force answer keys.

Pool sizing (bytes -> blocks), block tables grown through the allocator, the padded batch tensor,
slot mapping (tensor ops) against a per-token Python model, and ``kernels.store_kv`` (simulator on CPU)
against a dense per-token copy.
"""

import random

import pytest
import torch

from kernels.store_kv import store_kv, store_kv_ref
from minivllm.cache import (BlockAllocator, BlockTable, KVShape, OutOfBlocksError, PagedKVCache, block_tables_tensor,
                            blocks_for_budget, bytes_per_block, decode_slot_mapping, slot_mapping)
from minivllm.model.config import ModelConfig


def _config(layers=2, kv_heads=2, head_dim=8) -> KVShape:
    return ModelConfig(architecture="qwen3", vocab_size=32, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=layers, num_attention_heads=2 * kv_heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim).kv_shape


# ----------------------------------------------------------------------------- the pool
def test_bytes_per_block_counts_every_layer_k_and_v():
    qwen3_06b = _config(layers=28, kv_heads=8, head_dim=128)
    assert bytes_per_block(qwen3_06b, torch.bfloat16) == 28 * 2 * 16 * 8 * 128 * 2  # 1.75 MiB, 112 KiB a token
    assert bytes_per_block(_config(), torch.float32, block_size=4) == 2 * 2 * 4 * 2 * 8 * 4


def test_blocks_for_budget_is_the_floor_and_refuses_a_budget_below_one_block():
    cfg = _config()
    per = bytes_per_block(cfg, torch.float16)
    assert blocks_for_budget(cfg, 10 * per, torch.float16) == 10
    assert blocks_for_budget(cfg, 11 * per - 1, torch.float16) == 10
    with pytest.raises(ValueError, match="holds no block"):
        blocks_for_budget(cfg, per - 1, torch.float16)
    with pytest.raises(ValueError, match="non-negative"):
        blocks_for_budget(cfg, -1, torch.float16)


def test_pool_has_one_tensor_per_layer_in_the_documented_layout():
    cfg = _config(layers=3)
    cache = PagedKVCache.from_budget(cfg, 7 * bytes_per_block(cfg, torch.float32) + 5)
    assert cache.num_layers == 3 and cache.num_blocks == 7 and cache.num_slots == 7 * 16
    assert all(t.shape == (7, 2, 16, 2, 8) and t.is_contiguous() for t in cache.kv)
    assert cache.nbytes == 7 * bytes_per_block(cfg, torch.float32)
    cache.kv[1][3, 1, 5] = 1.0
    assert cache.value(1)[3, 5].eq(1).all() and cache.key(1).eq(0).all() and cache.kv[0].eq(0).all()
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        PagedKVCache.allocate(cfg, 0)
    with pytest.raises(ValueError, match="same shape"):
        PagedKVCache([torch.zeros(2, 2, 4, 1, 8), torch.zeros(3, 2, 4, 1, 8)])


@pytest.mark.gpu
def test_gpu_budget_leaves_room_for_the_profiled_peak():
    from minivllm.cache.kv_cache import gpu_kv_budget

    free, total = torch.cuda.mem_get_info()
    without = gpu_kv_budget("cuda", 0.9)
    with_peak = gpu_kv_budget("cuda", 0.9, profile=lambda: torch.empty(1 << 30, dtype=torch.uint8, device="cuda"))
    assert 0 < with_peak <= without - (1 << 30) + (1 << 21) and without <= 0.9 * total
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        gpu_kv_budget("cuda", 1.5)


@pytest.mark.gpu
def test_with_a_baseline_the_budget_is_the_engines_own_share_and_fits_what_is_free():
    from minivllm.cache.kv_cache import gpu_kv_budget, gpu_memory_baseline

    free, total = torch.cuda.mem_get_info()
    alone = gpu_kv_budget("cuda", 0.9, baseline=gpu_memory_baseline("cuda"))
    assert 0 < alone <= 0.9 * total
    held = torch.empty(int(free * 0.6), dtype=torch.uint8, device="cuda")  # held before the engine began
    beside = gpu_kv_budget("cuda", 0.9, baseline=gpu_memory_baseline("cuda"))
    now, _ = torch.cuda.mem_get_info()
    assert 0 < beside <= now + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    small = gpu_kv_budget("cuda", 0.05, baseline=gpu_memory_baseline("cuda"))  # a share that fits: all of it
    assert 0.04 * total < small <= 0.05 * total
    del held


_ENGINE_PROCESS = """
import sys
from bench.models import TINY
from minivllm.engine import LLMEngine
from minivllm.sampling_params import SamplingParams
e = LLMEngine(model=TINY, device="cuda", dtype="float32", max_model_len=256, enforce_eager=True,
              gpu_memory_utilization=float(sys.argv[1]))
print("blocks", e.num_kv_blocks, flush=True)
e.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
tokens = 0
while e.has_unfinished_requests():
    tokens += sum(len(o.outputs[0].token_ids) for o in e.step() if o.finished)
print("tokens", tokens, flush=True)
sys.stdin.readline()  # holds its memory until told
"""


@pytest.mark.gpu
def test_a_second_engine_process_starts_beside_a_first_with_its_own_share():
    """Two engine processes on one GPU (make test's workers, two notebooks): the second one's
    gpu_memory_utilization is its own share, so the first one's memory does not count against it (before, 0.1 of
    the GPU less the first one's 0.2 left nothing, and it failed)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))

    def start(share):
        return subprocess.Popen([sys.executable, "-c", _ENGINE_PROCESS, str(share)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, env=env)

    first = start(0.2)
    try:
        held = first.stdout.readline().split()
        assert held[:1] == ["blocks"] and first.stdout.readline().split() == ["tokens", "4"], first.stderr.read()
        second = start(0.1)
        out, err = second.communicate("\n", timeout=300)
        lines = [line.split() for line in out.splitlines()]
        assert second.returncode == 0 and lines[1] == ["tokens", "4"], err[-3000:]
        assert 0 < int(lines[0][1]) < int(held[1])  # a cache sized by its own (smaller) share
    finally:
        first.communicate("\n", timeout=120)


def test_the_gpu_budget_arithmetic_names_memory_held_elsewhere_when_nothing_is_left():
    """``kv_budget`` without a baseline (gpu_kv_budget's arithmetic, no GPU needed): 90% of 80 GiB, less the rest of
    the GPU's use and this engine's peak; a GPU already filled by another engine raises an error that says so."""
    from minivllm.cache.kv_cache import GIB, kv_budget

    total = 80 * GIB
    # an idle GPU: 0.5 GiB of CUDA context, this process has reserved 2 GiB and peaked at 1.5
    want = 72 * GIB - GIB // 2 - 3 * GIB // 2
    assert kv_budget(total, total - 2 * GIB - GIB // 2, 2 * GIB, 3 * GIB // 2, 0.9) == want
    # another engine holds 71 GiB: nothing is left for a second one
    with pytest.raises(RuntimeError, match=r"rest of the GPU holds 71\.5 GiB .*another engine.*num_kv_blocks"):
        kv_budget(total, total - 2 * GIB - 71 * GIB - GIB // 2, 2 * GIB, 3 * GIB // 2, 0.9)


def test_with_a_baseline_the_share_is_the_engines_own_and_never_more_than_is_free():
    """``kv_budget`` with the GPU's memory when the engine began (vLLM's meaning of gpu_memory_utilization): other
    processes' memory is not counted against the share, what this process took outside torch since then is, and the
    cache never takes more than is free less ``KV_HEADROOM``: a second engine beside a first starts with what fits."""
    from minivllm.cache.kv_cache import GIB, KV_HEADROOM, MemoryBaseline, kv_budget

    total, tenth = 80 * GIB, 8 * GIB // 10
    # alone: the CUDA context (0.5 GiB) came before the baseline; weights + step peak 1.5, 1.2 held, 2 reserved,
    # and 0.3 GiB of compiled kernels outside torch since
    alone = MemoryBaseline(free=total - GIB // 2, reserved=0)
    free = alone.free - 2 * GIB - 3 * tenth // 8
    outside = alone.free - free - 2 * GIB
    got = kv_budget(total, free, 2 * GIB, 3 * GIB // 2, 0.9, alone, 12 * GIB // 10)
    assert got == int(total * 0.9) - 3 * GIB // 2 - outside
    # beside an engine that holds 72.5 GiB: 7 GiB were free at the start; its share (0.9) is more than is free
    beside = MemoryBaseline(free=7 * GIB, reserved=0)
    free = beside.free - 2 * GIB - outside
    fits = free + 2 * GIB - 12 * GIB // 10 - KV_HEADROOM
    assert kv_budget(total, free, 2 * GIB, 3 * GIB // 2, 0.9, beside, 12 * GIB // 10) == fits
    # ... and a share that fits: 5% of the GPU is 4 GiB, less its own peak and what it took outside torch
    assert kv_budget(total, free, 2 * GIB, 3 * GIB // 2, 0.05, beside, 12 * GIB // 10) == \
        int(total * 0.05) - 3 * GIB // 2 - outside
    # beside an engine of the same process (a notebook's earlier one, 72.5 GiB reserved, 72 allocated): its memory is
    # not this engine's peak; the cache gets what is free, with torch's unused reserve
    earlier = MemoryBaseline(free=7 * GIB, reserved=72 * GIB + GIB // 2, allocated=72 * GIB)
    free, ours = earlier.free - 2 * GIB - outside, earlier.reserved + 2 * GIB
    fits = free + ours - (72 * GIB + 12 * GIB // 10) - KV_HEADROOM
    assert kv_budget(total, free, ours, 72 * GIB + 3 * GIB // 2, 0.9, earlier, 72 * GIB + 12 * GIB // 10) == fits
    assert kv_budget(total, free, ours, 72 * GIB + 3 * GIB // 2, 0.05, earlier, 72 * GIB + 12 * GIB // 10) == \
        int(total * 0.05) - 3 * GIB // 2 - outside
    # nothing free: the clear error
    full = MemoryBaseline(free=2 * GIB + 4 * tenth // 8, reserved=0)  # 0.1 GiB free once this one has loaded
    with pytest.raises(RuntimeError, match="no GPU memory is left for the KV cache"):
        kv_budget(total, full.free - 2 * GIB - outside, 2 * GIB, 3 * GIB // 2, 0.9, full, 12 * GIB // 10)


def test_the_default_share_comes_from_the_environment_when_set(monkeypatch):
    """Several engines on one GPU (two notebooks, a test run's workers) each take their own share, so one variable,
    inherited by every kernel and subprocess, sizes them all: ``$MINIVLLM_GPU_MEMORY_UTILIZATION``, else 0.9. An
    explicit argument wins; a bad value is a clear error naming the variable."""
    from minivllm.cli import _cmd_serve, build_parser
    from minivllm.config import GPU_MEMORY_UTILIZATION_ENV, EngineConfig, default_gpu_memory_utilization

    monkeypatch.delenv(GPU_MEMORY_UTILIZATION_ENV, raising=False)
    assert default_gpu_memory_utilization() == 0.9 and EngineConfig().gpu_memory_utilization == 0.9
    monkeypatch.setenv(GPU_MEMORY_UTILIZATION_ENV, " 0.35 ")
    assert EngineConfig().gpu_memory_utilization == 0.35
    assert EngineConfig(gpu_memory_utilization=0.6).gpu_memory_utilization == 0.6
    for bad in ("half", "0", "1.5", "nan", "-0.2"):
        monkeypatch.setenv(GPU_MEMORY_UTILIZATION_ENV, bad)
        with pytest.raises(ValueError, match=f"\\${GPU_MEMORY_UTILIZATION_ENV} must be a number in \\(0, 1\\]"):
            EngineConfig()
    # the server: no flag leaves the share to the engine's default, the flag passes its value
    passed = []
    monkeypatch.setattr("minivllm.server.serve", lambda *a, **kw: passed.append(kw))
    _cmd_serve(build_parser().parse_args(["serve"]))
    _cmd_serve(build_parser().parse_args(["serve", "--gpu-memory-utilization", "0.5"]))
    assert "gpu_memory_utilization" not in passed[0] and passed[1]["gpu_memory_utilization"] == 0.5


def test_notebooks_run_at_once_split_their_process_share_of_the_gpu(monkeypatch):
    """``bench.notebooks`` (every notebook on a GPU, 8 at once) gives each notebook an even part of its own share:
    0.8 / 8 alone, and a test worker's 0.4 / 8 when it runs inside ``pytest -n 2``."""
    from bench.notebooks import notebook_share
    from minivllm.config import GPU_MEMORY_UTILIZATION_ENV

    monkeypatch.delenv(GPU_MEMORY_UTILIZATION_ENV, raising=False)
    assert notebook_share(8) == pytest.approx(0.1)
    monkeypatch.setenv(GPU_MEMORY_UTILIZATION_ENV, "0.4")
    assert notebook_share(8) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- block tables
def test_block_table_grows_one_block_at_a_time_and_releases_everything():
    alloc = BlockAllocator(6)
    table = BlockTable(block_size=4)
    assert table.grow(1, alloc) and len(table.block_ids) == 1
    assert table.grow(3, alloc) == [] and table.num_tokens == 4  # the first block is now full
    assert len(table.grow(5, alloc)) == 2 and table.num_tokens == 9  # 9 tokens need 3 blocks
    assert table.blocks_to_grow(3) == 0 and table.blocks_to_grow(4) == 1
    with pytest.raises(OutOfBlocksError):
        table.grow(4 * 4, alloc)
    assert table.num_tokens == 9 and len(table.block_ids) == 3  # nothing changed
    held = list(table.block_ids)
    assert table.release(alloc) == held and alloc.num_free == 6 and table.block_ids == []


def test_block_table_slots_follow_the_formula():
    table = BlockTable(block_size=4, block_ids=[7, 2, 5], num_tokens=10)
    assert table.slots(0, 10) == [28, 29, 30, 31, 8, 9, 10, 11, 20, 21]
    with pytest.raises(ValueError, match="outside a table"):
        table.slots(0, 13)
    with pytest.raises(ValueError, match="cannot hold"):
        BlockTable(block_size=4, block_ids=[1], num_tokens=5)


def test_block_tables_tensor_pads_shorter_rows():
    t = block_tables_tensor([[3, 1], [], [0, 4, 2]])
    assert t.dtype == torch.int32 and t.tolist() == [[3, 1, -1], [-1, -1, -1], [0, 4, 2]]
    assert block_tables_tensor([[1]], width=4, pad=0).tolist() == [[1, 0, 0, 0]]
    with pytest.raises(ValueError, match="smaller than the longest"):
        block_tables_tensor([[1, 2]], width=1)


@pytest.mark.parametrize("seed", range(5))
def test_slot_mapping_matches_a_per_token_model_on_random_batches(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
    alloc = BlockAllocator(sum(-(-n // bs) for n in lens) + 5)
    alloc.free(alloc.allocate(alloc.num_blocks)[::-1])  # hand blocks out in a shuffled order
    shuffled = alloc.allocate(alloc.num_blocks)
    rng.shuffle(shuffled)
    alloc.free(shuffled)
    tables = [BlockTable(bs) for _ in lens]
    for table, n in zip(tables, lens):
        table.grow(n, alloc)
    # a prefill chunk of each sequence: a random span of its positions, plus padding tokens
    seq_index, positions, want = [], [], []
    for s, (table, n) in enumerate(zip(tables, lens)):
        a = rng.randint(0, n - 1)
        b = rng.randint(a + 1, n)
        seq_index += [s] * (b - a) + [0]
        positions += list(range(a, b)) + [-1]
        want += [table.block_ids[p // bs] * bs + p % bs for p in range(a, b)] + [-1]
    bt = block_tables_tensor([t.block_ids for t in tables])
    got = slot_mapping(bt, torch.tensor(positions), bs, torch.tensor(seq_index))
    assert got.dtype == torch.int64 and got.tolist() == want
    decode = decode_slot_mapping(bt, torch.tensor(lens, dtype=torch.int32), bs)
    assert decode.tolist() == [t.slots(n - 1, n)[0] for t, n in zip(tables, lens)]


def test_slot_mapping_of_one_sequence_and_bad_positions():
    table = torch.tensor([5, 0, -1], dtype=torch.int32)
    assert slot_mapping(table, torch.tensor([0, 3, 4, -1]), 4).tolist() == [20, 23, 0, -1]
    with pytest.raises(ValueError, match="padding entry"):
        slot_mapping(table, torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="past its block table"):
        slot_mapping(table, torch.tensor([12]), 4)
    with pytest.raises(ValueError, match="seq_index"):
        slot_mapping(table.view(1, 3).expand(2, 3), torch.tensor([1]), 4)


# ----------------------------------------------------------------------------- the KV-store kernel
def _store_case(seed: int, dtype: torch.dtype, tokens: int = 7, heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(6, 2, 4, heads, dim, generator=g).to(dtype)
    key = torch.randn(tokens, heads, dim, generator=g).to(dtype)
    value = torch.randn(tokens, heads, dim, generator=g).to(dtype)
    slots = torch.randperm(24, generator=g)[:tokens]
    slots[::3] = -1  # padding tokens are skipped
    return key, value, cache, slots


def _store_model(key, value, cache, slots):
    out = cache.clone()
    for t, s in enumerate(slots.tolist()):  # brute force: one token at a time
        if s >= 0:
            out[s // cache.shape[2], 0, s % cache.shape[2]] = key[t]
            out[s // cache.shape[2], 1, s % cache.shape[2]] = value[t]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_store_kv_writes_each_token_to_its_slot(dtype, backend):
    key, value, cache, slots = _store_case(1, dtype)
    want = _store_model(key, value, cache, slots)
    assert store_kv(key, value, cache, slots, backend=backend) is cache
    assert torch.equal(cache, want)


def test_store_kv_kernel_covers_more_elements_than_threads():
    key, value, cache, slots = _store_case(2, torch.float32, tokens=12, heads=2, dim=16)  # 384 > 4 x 64
    want = _store_model(key, value, cache, slots)
    store_kv(key, value, cache, slots, backend="numba")
    assert torch.equal(cache, want)


def test_store_kv_rejects_bad_arguments():
    key, value, cache, slots = _store_case(3, torch.float32)
    with pytest.raises(TypeError, match="slot_mapping must have dtype in \\(int64\\)"):
        store_kv(key, value, cache, slots.int())
    with pytest.raises(ValueError, match="kv_cache must have shape"):
        store_kv(key, value, cache[:, :, :, :1], slots)
    with pytest.raises(TypeError, match="kv_cache must have dtype"):
        store_kv(key, value, cache.half(), slots)
    with pytest.raises(ValueError, match="slot_mapping must hold -1"):
        store_kv(key, value, cache, torch.full_like(slots, 24))
    with pytest.raises(ValueError, match="value has shape"):
        store_kv(key, value[:1], cache, slots)


@pytest.mark.gpu
def test_gpu_store_kv_bf16_matches_torch():
    key, value = (torch.randn(300, 8, 128, device="cuda").to(torch.bfloat16) for _ in range(2))
    cache = torch.zeros(40, 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    slots = torch.randperm(640, device="cuda")[:300]
    slots[::7] = -1
    want = cache.clone()
    store_kv_ref(key, value, want, slots)
    store_kv(key, value, cache, slots)
    assert torch.equal(cache, want)
