"""Phase 08: paged decode attention version 2 (warp per token) against the dense reference, in the simulator.

The same answer key as version 1 (``paged_attention_ref``: gather each sequence's blocks, then SDPA):
randomized lengths, shuffled block tables, GQA groups 1/2/3/8, head_dim 16..128, split-K. On a GPU: bf16 and
long contexts, and the CUDA-graph path (``max_context_len``).
"""

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_warp import paged_attention_warp


def _case(seqs, q_heads, kv_heads, dim, max_len, dtype=torch.float32, device="cpu", seed=0, block_size=16):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (seqs,), generator=g)
    width = -(-int(lens.max()) // block_size)
    num_blocks = seqs * width + 3
    tables = torch.randperm(num_blocks, generator=g)[: seqs * width].view(seqs, width).to(torch.int32)
    cache = torch.randn(num_blocks, 2, block_size, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(seqs, q_heads, dim, generator=g).to(dtype)
    return (q.to(device), cache.to(device), tables.to(device), lens.to(torch.int32).to(device))


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(2, 2, 32), (4, 2, 64), (3, 1, 16), (2, 1, 128), (4, 1, 40)])
def test_warp_kernel_matches_reference_in_the_simulator(q_heads, kv_heads, dim):
    q, cache, tables, lens = _case(2, q_heads, kv_heads, dim, max_len=13, seed=dim + q_heads)
    got = paged_attention_warp(q, cache, tables, lens, warps=2)
    torch.testing.assert_close(got, paged_attention_ref(q, cache, tables, lens), atol=2e-5, rtol=1e-4)


def test_warp_kernel_split_k_and_fp16_in_the_simulator():
    q, cache, tables, lens = _case(2, 2, 1, 32, max_len=40, dtype=torch.float16, seed=7)
    got = paged_attention_warp(q, cache, tables, lens, tokens_per_split=16, warps=2)
    torch.testing.assert_close(got.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=2e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("seqs,max_len", [(64, 3000), (3, 32768), (256, 600)])
def test_warp_kernel_on_gpu_bf16_long_contexts(seqs, max_len):
    q, cache, tables, lens = _case(seqs, 16, 8, 128, max_len, dtype=torch.bfloat16, device="cuda", seed=seqs)
    ref = paged_attention_ref(q, cache, tables, lens).float()
    torch.testing.assert_close(paged_attention_warp(q, cache, tables, lens).float(), ref, atol=2e-2, rtol=2e-2)
    graphed = paged_attention_warp(q, cache, tables, lens, max_context_len=max_len)  # the CUDA-graph call
    torch.testing.assert_close(graphed.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(2, 1, 128), (3, 1, 64)])
def test_wide_bf16_kernel_matches_reference_in_the_simulator(q_heads, kv_heads, dim):
    """16-byte loads (8 bf16 per lane, several tokens per warp), checked against the fp32 answer key."""
    q, cache, tables, lens = _case(2, q_heads, kv_heads, dim, max_len=13, dtype=torch.bfloat16, seed=dim)
    got = paged_attention_warp(q, cache, tables, lens, warps=2, wide=True)
    torch.testing.assert_close(got.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(("unroll", "split"), [(4, None), (2, 12)])
def test_wide_kernel_chunks_of_tokens_in_the_simulator(unroll, split):
    """Chunks of ``unroll`` tokens per lane group (one softmax rescale per chunk): contexts that end inside a
    chunk, chunks where only some lane groups have a token, and split-K chunks that are not a multiple of it."""
    q, cache, tables, lens = _case(2, 2, 1, 64, max_len=30, dtype=torch.bfloat16, seed=unroll, block_size=4)
    lens[0] = 1  # a single token: one lane group of one warp sees it
    got = paged_attention_warp(q, cache, tables, lens, warps=2, unroll=unroll, wide=True, tokens_per_split=split)
    torch.testing.assert_close(got.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fp8", [False, True])
def test_the_fused_merge_gives_the_two_kernels_result(fp8):
    """``fused_merge=True``: split-K without a merge kernel, the last block of each (sequence, KV head) merging the
    splits; the counters are back at zero afterwards, so a second launch (a graph replay) merges again."""
    from kernels.paged_attention_warp import _COUNTERS

    g = torch.Generator().manual_seed(7)
    seqs, q_heads, kv_heads, dim, bs = 2, 2, 1, 64, 4
    lens = torch.tensor([3, 13], dtype=torch.int32)  # 3 keys: splits past the end see none
    tables = torch.randperm(12, generator=g)[:8].view(seqs, 4).to(torch.int32)
    cache = torch.randn(12, 2, bs, kv_heads, dim, generator=g)
    cache = cache.to(torch.float8_e4m3fn) if fp8 else cache.to(torch.bfloat16)
    q = torch.randn(seqs, q_heads, dim, generator=g).to(torch.bfloat16)
    want = paged_attention_warp(q, cache, tables, lens, warps=1, tokens_per_split=4, fused_merge=False)
    for _ in range(2):  # the second launch finds the counters reset
        got = paged_attention_warp(q, cache, tables, lens, warps=1, tokens_per_split=4, fused_merge=True)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())
    torch.testing.assert_close(want.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_the_fused_merge_on_a_gpu_at_qwen3_shapes(fp8):
    """Small batches as the engine's graphs launch them (``max_context_len`` fixed, split-K over it): the fused
    merge gives the two kernels' result, launch after launch."""
    g = torch.Generator().manual_seed(8)
    seqs, q_heads, kv_heads, dim, bs = 8, 16, 8, 128, 16
    lens = torch.randint(1, 2000, (seqs,), generator=g).to(torch.int32)
    tables = torch.randperm(seqs * 128, generator=g)[: seqs * 128].view(seqs, 128).to(torch.int32)
    cache = torch.randn(seqs * 128, 2, bs, kv_heads, dim, generator=g)
    cache = cache.to(torch.float8_e4m3fn) if fp8 else cache.to(torch.bfloat16)
    q = torch.randn(seqs, q_heads, dim, generator=g).to(torch.bfloat16)
    q, cache, tables, lens = (t.cuda() for t in (q, cache, tables, lens))
    want = paged_attention_warp(q, cache, tables, lens, max_context_len=2048, fused_merge=False)
    for _ in range(3):
        got = paged_attention_warp(q, cache, tables, lens, max_context_len=2048, fused_merge=True)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("has_cvt", [False, True])  # below sm_89 / from it
@pytest.mark.parametrize("group,dim", [(2, 128), (3, 64)])  # Qwen3's and SmolLM2's shapes
def test_the_kernel_the_defaults_launch_is_compiled_by_the_gpu_check(monkeypatch, fp8, has_cvt, group, dim):
    """The 16-byte kernel a GPU launch picks with the module's defaults is one ``kernels._ptx`` builds (listed in
    SIGNATURES, and from sm_89 up where it converts e4m3 in hardware): the variants are built by a factory, so a
    new default could otherwise pick a kernel no CPU check ever compiled."""
    import kernels.paged_attention_warp as paw

    class Picked(Exception):
        pass

    factory, picked = paw._kernel16, []
    monkeypatch.setattr(paw, "resolve_backend", lambda *a, **kw: "gpu")
    monkeypatch.setattr(paw, "_has_cvt", lambda index: has_cvt)
    monkeypatch.setattr(paw, "_kernel16", lambda *a: picked.append(a) or (_ for _ in ()).throw(Picked()))
    q = torch.zeros(1, group, dim, dtype=torch.bfloat16)
    cache = torch.zeros(2, 2, 16, 1, dim).to(paw.FP8 if fp8 else torch.bfloat16)
    with pytest.raises(Picked):
        paw.paged_attention_warp(q, cache, torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    kernel = factory(*picked[0])
    assert kernel in paw.SIGNATURES, kernel.py_func.__name__
    assert (paw.MIN_TARGETS.get(kernel) == paw.CVT_CC) == (fp8 and has_cvt), kernel.py_func.__name__


def test_each_sequence_cuts_its_own_splits_only_under_a_long_key_limit(monkeypatch):
    """``DYNAMIC_SPLIT`` None (the default): a grid sized for ``DYNAMIC_SPLIT_MIN_KEYS`` keys or more (a CUDA graph
    under a long ``max_model_len``) has each sequence cut its own context (``-MIN_SPLIT``: ``_split_keys``); a shorter
    one keeps chunks sized for the limit; True / False force either; a caller's own split size is left alone."""
    import kernels.paged_attention_warp as paw

    monkeypatch.setattr(paw, "resident_blocks", lambda kernel, threads, device: 128)  # a GPU's slots, on a CPU
    monkeypatch.setattr(paw, "DYNAMIC_SPLIT", None)

    def plan(longest, tokens_per_split=None):
        return paw.plan_splits(8, longest, tokens_per_split, None, None, 128, torch.device("cpu"), "gpu")

    limit = paw.DYNAMIC_SPLIT_MIN_KEYS
    splits, keys, arg = plan(limit)
    assert splits == 16 and keys == limit // 16 and arg == -paw.MIN_SPLIT  # 128 slots / 8 blocks: 16 splits, dynamic
    assert plan(1041) == (16, 66, 66)  # a short limit: static chunks of cdiv(1041, 16) keys
    assert plan(limit, tokens_per_split=4096)[2] == 4096  # the caller's split size: static
    monkeypatch.setattr(paw, "DYNAMIC_SPLIT", False)
    assert plan(limit)[2] == limit // 16
    monkeypatch.setattr(paw, "DYNAMIC_SPLIT", True)
    assert plan(1041)[2] == -paw.MIN_SPLIT


@pytest.mark.parametrize("fp8", [False, True])
def test_each_sequences_own_splits_give_the_reference_result(fp8):
    """``dynamic_split``: a grid sized for 32 keys (8 splits of 4), each sequence cutting its own 3 or 13 keys into
    those splits (chunks of at least 2): the fused merge's result equals the reference's."""
    g = torch.Generator().manual_seed(9)
    seqs, q_heads, kv_heads, dim, bs = 2, 2, 1, 64, 4
    lens = torch.tensor([3, 13], dtype=torch.int32)
    tables = torch.randperm(16, generator=g)[:16].view(seqs, 8).to(torch.int32)
    cache = torch.randn(16, 2, bs, kv_heads, dim, generator=g)
    cache = cache.to(torch.float8_e4m3fn) if fp8 else cache.to(torch.bfloat16)
    q = torch.randn(seqs, q_heads, dim, generator=g).to(torch.bfloat16)
    static = paged_attention_warp(q, cache, tables, lens, warps=1, tokens_per_split=4, max_context_len=32,
                                  fused_merge=True, dynamic_split=0)
    for _ in range(2):  # a second launch (a graph replay) finds the counters reset
        got = paged_attention_warp(q, cache, tables, lens, warps=1, tokens_per_split=4, max_context_len=32,
                                   fused_merge=True, dynamic_split=2)
        torch.testing.assert_close(got.float(), static.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=3e-2, rtol=3e-2)
