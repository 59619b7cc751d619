"""Paged decode attention (kernels.paged_attention) against dense attention over the same keys.

Each case builds every sequence's K and V as dense tensors first (the answer key never sees the pages),
scatters them into shuffled, non-contiguous blocks through block tables and slot mapping, and compares
the kernel (simulator on CPU: few sequences, short contexts) and the gather reference (contexts up to
300) with softmax(q k^T / sqrt(d)) v computed on the dense tensors.
"""

import math
import random

import pytest
import torch

from kernels.paged_attention import gather_kv, merge_partials, paged_attention, paged_attention_ref
from kernels.store_kv import store_kv_ref
from minivllm.cache import BlockAllocator, BlockTable, block_tables_tensor, slot_mapping

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _batch(seed, lens, q_heads, kv_heads, dim, dtype, block_size=16, device="cpu"):
    """(q, kv_cache, block_tables, context_lens, dense K list, dense V list), blocks shuffled."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    alloc = BlockAllocator(num_blocks)
    order = list(range(num_blocks))
    rng.shuffle(order)
    alloc.allocate(num_blocks)
    alloc.free(order)  # freed in a shuffled order: handed out again in that order
    tables = [BlockTable(block_size) for _ in lens]
    cache = torch.zeros(num_blocks, 2, block_size, kv_heads, dim, dtype=dtype)
    ks, vs = [], []
    for i in range(max(lens)):  # sequences grow interleaved, as in decode: their blocks interleave
        for table, n in zip(tables, lens):
            if i < n:
                table.grow(1, alloc)
    for table, n in zip(tables, lens):
        k = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
        bt = torch.tensor(table.block_ids, dtype=torch.int32)
        store_kv_ref(k, v, cache, slot_mapping(bt, torch.arange(n), block_size))
        ks.append(k)
        vs.append(v)
    q = torch.randn(len(lens), q_heads, dim, generator=g).to(dtype)
    bt = block_tables_tensor([t.block_ids for t in tables])
    ctx = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, cache, bt, ctx)) + (ks, vs)


def _dense(q, ks, vs):
    """softmax(q k^T / sqrt(d)) v per sequence and query head, in float64, from the dense K and V."""
    out = []
    for s, (k, v) in enumerate(zip(ks, vs)):
        group = q.shape[1] // k.shape[1]
        k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)  # (ctx, q_heads, d)
        scores = torch.einsum("hd,thd->ht", q[s].double(), k) / math.sqrt(q.shape[2])
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def _assert_close(got, want, dtype):
    assert got.dtype == dtype
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= TOL[dtype], f"max |err| {err:.2e} > {TOL[dtype]:.0e}"


# ----------------------------------------------------------------------------- the reference (pure torch)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ratio", [1, 2, 3, 8])
def test_gather_reference_matches_dense_attention(seed, ratio):
    rng = random.Random(seed * 10 + ratio)
    lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 6))]
    q, cache, bt, ctx, ks, vs = _batch(seed, lens, 2 * ratio, 2, rng.choice([64, 128]), torch.float32)
    _assert_close(paged_attention_ref(q, cache, bt, ctx), _dense(q, ks, vs), torch.float32)
    k, v = gather_kv(cache, bt[0], lens[0])
    assert torch.equal(k, ks[0]) and torch.equal(v, vs[0])


def test_merging_split_results_equals_attention_over_all_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, generator=g), torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    parts, ms, ls = [], [], []
    for lo, hi in [(0, 7), (7, 30), (30, 50)]:
        s = k[lo:hi] @ q
        ms.append(s.max())
        ls.append(torch.exp(s - s.max()).sum())
        parts.append(torch.softmax(s, 0) @ v[lo:hi])
    parts.append(torch.zeros(4))  # an empty split
    ms.append(torch.tensor(-math.inf))
    ls.append(torch.tensor(0.0))
    got = merge_partials(torch.stack(parts), torch.stack(ms), torch.stack(ls))
    torch.testing.assert_close(got, torch.softmax(k @ q, 0) @ v)


# ----------------------------------------------------------------------------- the kernel (simulator)
@pytest.mark.parametrize(("seed", "ratio", "dim", "dtype"), [
    (0, 1, 64, torch.float32),
    (1, 2, 64, torch.float16),
    (2, 3, 64, torch.bfloat16),
    (3, 8, 64, torch.float32),
    (4, 2, 128, torch.float32),
    (5, 1, 128, torch.bfloat16),
])
def test_kernel_matches_dense_attention(seed, ratio, dim, dtype):
    rng = random.Random(seed)
    lens = [1] + [rng.randint(2, 40) for _ in range(1 if ratio == 8 else 2)]
    rng.shuffle(lens)
    q, cache, bt, ctx, ks, vs = _batch(seed, lens, ratio, 1, dim, dtype)
    _assert_close(paged_attention(q, cache, bt, ctx, backend="numba"), _dense(q, ks, vs), dtype)


@pytest.mark.parametrize(("tokens_per_split", "dtype"), [(16, torch.float32), (13, torch.bfloat16)])
def test_split_k_kernel_matches_dense_attention(tokens_per_split, dtype):
    lens = [45, 5]  # the short sequence leaves most of its splits empty
    q, cache, bt, ctx, ks, vs = _batch(7, lens, 4, 2, 64, dtype)
    got = paged_attention(q, cache, bt, ctx, tokens_per_split=tokens_per_split, backend="numba")
    _assert_close(got, _dense(q, ks, vs), dtype)


def test_kernel_over_a_300_token_context():
    q, cache, bt, ctx, ks, vs = _batch(8, [300], 2, 1, 64, torch.float32)
    _assert_close(paged_attention(q, cache, bt, ctx, threads=64, backend="numba"), _dense(q, ks, vs), torch.float32)


def test_kernel_writes_into_out_and_takes_a_scale():
    q, cache, bt, ctx, ks, vs = _batch(9, [20, 3], 2, 2, 64, torch.float32)
    out = torch.empty_like(q)
    assert paged_attention(q, cache, bt, ctx, scale=0.0, out=out, backend="numba") is out
    mean_v = torch.stack([v.double().mean(0) for v in vs])  # scale 0: uniform weights
    torch.testing.assert_close(out.double(), mean_v, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bad arguments
def test_bad_arguments_are_refused():
    q, cache, bt, ctx, _, _ = _batch(10, [20, 3], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_attention(q[:, :3].contiguous(), cache, bt, ctx)
    with pytest.raises(ValueError, match="at most 8 times"):
        paged_attention(torch.zeros(2, 18, 64), cache, bt, ctx)
    with pytest.raises(TypeError, match="kv_cache must have dtype"):
        paged_attention(q, cache.half(), bt, ctx)
    with pytest.raises(TypeError, match="block_tables must have dtype in \\(int32\\)"):
        paged_attention(q, cache, bt.long(), ctx)
    with pytest.raises(ValueError, match="context_lens must be in 1..32"):
        paged_attention(q, cache, bt, torch.tensor([33, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="context_lens must be in"):
        paged_attention(q, cache, bt, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_tables must hold blocks"):
        paged_attention(q, cache, torch.full_like(bt, -1), ctx)
    with pytest.raises(ValueError, match="head_dim must be at most 128"):
        paged_attention(torch.zeros(2, 4, 256), torch.zeros(4, 2, 16, 2, 256), bt, ctx)
    with pytest.raises(ValueError, match="threads must be a multiple of 32"):
        paged_attention(q, cache, bt, ctx, threads=48, backend="numba")
    with pytest.raises(ValueError, match="tokens_per_split must be positive"):
        paged_attention(q, cache, bt, ctx, tokens_per_split=0, backend="numba")
    with pytest.raises(ValueError, match="kv_cache must be"):
        paged_attention(q, cache[:, :1].contiguous(), bt, ctx)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize(("lens", "ratio", "dim"), [
    ([1, 17, 300, 2048, 5000], 2, 128),
    ([32768], 2, 128),
    ([32768, 100, 9000], 3, 64),
    (random.Random(0).choices(range(1, 4097), k=64), 8, 128),
])
@pytest.mark.parametrize("split", [None, 512])
def test_gpu_bf16_long_contexts(lens, ratio, dim, split):
    q, cache, bt, ctx, ks, vs = _batch(11, lens, 2 * ratio, 2, dim, torch.bfloat16, device="cuda")
    got = paged_attention(q, cache, bt, ctx, tokens_per_split=split)
    want = paged_attention_ref(q, cache, bt, ctx)  # gather + SDPA on the GPU
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)
    _assert_close(got[:1], _dense(q[:1].cpu(), ks[:1], vs[:1]), torch.bfloat16)


@pytest.mark.gpu
def test_gpu_kernel_is_captured_by_a_cuda_graph():
    from kernels._timing import capture_graph

    q, cache, bt, ctx, ks, vs = _batch(12, [700, 40], 16, 8, 128, torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    graph = capture_graph(lambda: paged_attention(q, cache, bt, ctx, out=out, max_context_len=700,
                                                  tokens_per_split=256))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), paged_attention_ref(q, cache, bt, ctx).float(), rtol=0, atol=2e-2)
