"""The fused QK-norm + RoPE + KV-store kernel (``kernels.qkv_prep``) against the unfused steps.

In numba's CUDA simulator (the kernel's own source, thread by thread) on tiny shapes: every dtype, with and
without QK-norm (Qwen3 / Llama), head sizes whose pairs reduce by shuffles (<= 32 threads) and across warps
(64 threads), padding slots (-1) stored nowhere, a position outside the RoPE table refused. On a GPU the same
cases run the kernel itself, and Qwen3-0.6B's shapes too. Two
references: the torch references of the three steps (``qkv_prep_ref``), and the three unfused *kernels* the model
ran before (``kernels.rmsnorm`` / ``kernels.rope`` / ``kernels.store_kv``). And the model: a Qwen3 and a Llama
layer give the same logits through the fused path as through the unfused one. Compiling it for every GPU target
is ``test_01_compile``'s (``SIGNATURES``).
"""

import pytest
import torch

import kernels  # noqa: F401  (numba's simulator without a GPU)
from kernels._env import simulator_enabled
from kernels.qkv_prep import qkv_prep, qkv_prep_ref, split_qkv, supported
from kernels.rmsnorm import rms_norm
from kernels.rope import apply_rope, rope_cache
from kernels.store_kv import store_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the simulator on a CPU, the kernel itself on a GPU
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def case(dtype, d, q_heads=4, kv_heads=2, tokens=3, seed=0, block_size=4):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d, generator=g).mul(3).to(dtype)
    qw = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype)
    kw = (1 + 0.2 * torch.randn(d, generator=g)).to(dtype)
    positions = torch.randint(0, 500, (tokens,), generator=g)
    blocks = tokens // block_size + 4
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    slots[1] = -1  # a padding row: stored nowhere
    cache = torch.zeros(blocks, 2, block_size, kv_heads, d, dtype=dtype)
    return tuple(x.to(DEVICE) for x in (qkv, qw, kw, positions, rope_cache(d, 512, 1e6), cache, slots))


def unfused_kernels(qkv, q_heads, kv_heads, positions, cos_sin, cache, slots, qw, kw, eps=1e-6):
    """What the model ran before: the three kernels one after the other (in the simulator)."""
    q, k, v = split_qkv(qkv, q_heads, kv_heads, cos_sin.shape[1])
    if qw is not None:
        q = rms_norm(q.contiguous().view(-1, q.shape[-1]), qw, eps, backend="numba").view(q.shape)
        k = rms_norm(k.contiguous().view(-1, k.shape[-1]), kw, eps, backend="numba").view(k.shape)
    else:
        q, k = q.contiguous(), k.contiguous()
    apply_rope(q, k, positions, cos_sin, backend="numba")
    store_kv(k, v.contiguous(), cache, slots, backend="numba")
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 64, 128])
@pytest.mark.parametrize("norm", [True, False])
def test_fused_equals_the_three_steps(dtype, d, norm):
    q_heads, kv_heads = (4, 2) if d <= 64 else (2, 1)  # the simulator runs every thread in Python: keep it small
    qkv, qw, kw, positions, cos_sin, cache, slots = case(dtype, d, q_heads, kv_heads)
    weights = (qw, kw) if norm else (None, None)
    ref_cache, ker_cache = cache.clone(), cache.clone()
    want_q, want_k, want_v = qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, ref_cache, slots, *weights)
    q, k, v = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, cache, slots, *weights, backend="numba")
    torch.testing.assert_close(q, want_q, **TOL[dtype])
    torch.testing.assert_close(k, want_k, **TOL[dtype])
    assert torch.equal(v, want_v) and v.data_ptr() == qkv.data_ptr() + (q_heads + kv_heads) * d * qkv.element_size()
    torch.testing.assert_close(cache, ref_cache, **TOL[dtype])
    ker_q, ker_k = unfused_kernels(qkv, q_heads, kv_heads, positions, cos_sin, ker_cache, slots, *weights)
    torch.testing.assert_close(q, ker_q, **TOL[dtype])
    torch.testing.assert_close(k, ker_k, **TOL[dtype])
    torch.testing.assert_close(cache, ker_cache, **TOL[dtype])
    if dtype != torch.float32:  # most values round to the very same dtype value as the unfused kernels'
        assert (q == ker_q).float().mean() > 0.97 and (k == ker_k).float().mean() > 0.97
    stored = set(slots[slots >= 0].tolist())
    flat = cache.permute(0, 2, 1, 3, 4).reshape(-1, 2, kv_heads, d)  # (slots, 2, kv_heads, d)
    for s in range(flat.shape[0]):
        assert bool(flat[s].abs().sum() > 0) == (s in stored), f"slot {s}"  # -1 rows went nowhere


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="a GPU: real shapes (the simulator takes tiny ones)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", [dict(warp=False), dict(warp=True), dict(vec=True)], ids=["block", "warp", "vec"])
def test_fused_on_real_shapes(dtype, kernel):
    q_heads, kv_heads, d = 16, 8, 128  # Qwen3-0.6B
    qkv, qw, kw, positions, cos_sin, cache, slots = case(dtype, d, q_heads, kv_heads, tokens=777, block_size=16)
    ref_cache, ker_cache = cache.clone(), cache.clone()
    want_q, want_k, _ = qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, ref_cache, slots, qw, kw)
    q, k, _ = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, cache, slots, qw, kw, **kernel)
    ker_q, ker_k = unfused_kernels(qkv, q_heads, kv_heads, positions, cos_sin, ker_cache, slots, qw, kw)
    for got, want, ker in ((q, want_q, ker_q), (k, want_k, ker_k), (cache, ref_cache, ker_cache)):
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got, ker, **TOL[dtype])


@pytest.mark.skipif(DEVICE != "cpu", reason="positions are checked on CPU tensors only (no GPU sync)")
def test_a_position_outside_the_table_is_refused_before_launching():
    qkv, qw, kw, positions, cos_sin, cache, slots = case(torch.float32, 8)
    with pytest.raises(ValueError, match="positions"):  # CPU tensors: checked before launching
        qkv_prep(qkv, 4, 2, positions + 1000, cos_sin, cache, slots, qw, kw, backend="numba")


def test_bad_arguments_get_clear_errors():
    qkv, qw, kw, positions, cos_sin, cache, slots = case(torch.float32, 8)
    with pytest.raises(ValueError, match="qkv must be"):
        qkv_prep(qkv[:, :-8], 4, 2, positions, cos_sin, cache, slots, qw, kw)
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        qkv_prep(qkv, 4, 2, positions, cos_sin, cache, slots, qw, None)
    with pytest.raises(ValueError, match="head_dim 12"):
        qkv_prep(torch.zeros(3, 8 * 12, device=DEVICE), 4, 2, positions, rope_cache(12, 512, 1e6).to(DEVICE), cache,
                 slots)
    assert [d for d in range(2, 300, 2) if supported(d)] == [2, 4, 8, 16, 32, 64, 128, 256]


@pytest.mark.skipif(not simulator_enabled(), reason="runs the model's kernels in numba's CUDA simulator")
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_the_model_gives_the_same_logits_through_the_fused_path(arch, monkeypatch):
    """A two-layer model on paged attention metadata, its kernels in the simulator: the fused path against the
    unfused one (RMSNorm and RoPE kernels, then the store)."""
    from minivllm.cache import PagedKVCache
    from minivllm.model import layers, qwen3
    from minivllm.model.config import ModelConfig
    from minivllm.model.paged_attention import PagedAttentionMetadata

    cfg = ModelConfig(architecture=arch, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      qk_norm=arch == "qwen3", tie_word_embeddings=True)
    torch.manual_seed(0)
    model = qwen3.Qwen3ForCausalLM(cfg, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    ids, positions = torch.tensor([3, 9, 27, 5]), torch.tensor([0, 1, 2, 3])
    monkeypatch.setattr(layers, "_backend", lambda t: "numba")  # every layer's kernel, in the simulator
    logits = []
    for fused in (False, True):
        monkeypatch.setattr(qwen3, "fuse_qkv_prep", lambda qkv, meta, head_dim: fused)
        cache = PagedKVCache.allocate(cfg.kv_shape, 4, block_size=4, device="cpu", dtype=torch.float32)
        meta = PagedAttentionMetadata(cache, torch.tensor([0, 1, 2, 3]), torch.tensor([[0]], dtype=torch.int32),
                                      torch.tensor([4], dtype=torch.int32), num_decodes=0, max_context_len=4,
                                      query_lens=[4], prefill_context_lens=[4], backend="numba")
        with torch.no_grad():
            logits.append((model.compute_logits(model(ids, positions, meta)), torch.stack(list(cache.kv))))
    torch.testing.assert_close(logits[1][0], logits[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1][1], logits[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("norm", [True, False])
def test_the_warp_per_head_kernel_equals_the_block_kernel(dtype, d, norm):
    """``warp=True``: a warp per (token, head), the norm's sum by shuffles: the same values and cache as the block
    kernel (the same roundings), and as the three references."""
    q_heads, kv_heads = (4, 2) if d == 64 else (2, 1)
    qkv, qw, kw, positions, cos_sin, cache, slots = case(dtype, d, q_heads, kv_heads, tokens=3, seed=d)
    weights = (qw, kw) if norm else (None, None)
    block_cache, ref_cache = cache.clone(), cache.clone()
    want_q, want_k, _ = qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, ref_cache, slots, *weights)
    q, k, _ = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, cache, slots, *weights, warp=True,
                       backend="numba")
    bq, bk, _ = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, block_cache, slots, *weights, warp=False,
                         backend="numba")
    torch.testing.assert_close(q, want_q, **TOL[dtype])
    torch.testing.assert_close(k, want_k, **TOL[dtype])
    torch.testing.assert_close(cache, ref_cache, **TOL[dtype])
    for got, block in ((q, bq), (k, bk), (cache, block_cache)):  # the sum of squares in another order only
        if dtype == torch.float32:
            torch.testing.assert_close(got, block, atol=1e-5, rtol=1e-5)
        else:  # so nearly every value rounds to the very same bf16 value
            assert (got == block).float().mean() > 0.97


def test_the_warp_per_head_kernel_falls_back_where_the_head_size_does_not_fit():
    from kernels.qkv_prep import warp_supported

    assert [warp_supported(d) for d in (8, 32, 64, 96, 128, 256, 512)] == [False, False, True, False, True, True, False]
    qkv, qw, kw, positions, cos_sin, cache, slots = case(torch.float32, 8)
    ref_cache = cache.clone()
    want_q, want_k, _ = qkv_prep_ref(qkv, 4, 2, positions, cos_sin, ref_cache, slots, qw, kw)
    q, k, _ = qkv_prep(qkv, 4, 2, positions, cos_sin, cache, slots, qw, kw, warp=True, backend="numba")  # block kernel
    torch.testing.assert_close(q, want_q, **TOL[torch.float32])
    torch.testing.assert_close(cache, ref_cache, **TOL[torch.float32])


@pytest.mark.parametrize("fp8, norm", [(False, True), (True, True), (False, False)])
def test_the_word_wide_kernel_gives_the_other_kernels_bits(fp8, norm):
    """``vec=True`` (bf16, head size 128): each lane moves 4-byte words and rounds the norm in registers,
    not through memory; q, k and the cache (bf16, or fp8 bytes) are bit for bit the warp and block kernels'."""
    q_heads, kv_heads, d = 2, 1, 128
    qkv, qw, kw, positions, cos_sin, cache, slots = case(torch.bfloat16, d, q_heads, kv_heads, tokens=3, seed=d)
    if fp8:
        cache = cache.to(torch.float8_e4m3fn)
    weights = (qw, kw) if norm else (None, None)
    runs = {}
    for name, kernel in (("vec", dict(vec=True)), ("warp", dict(warp=True)), ("block", dict(warp=False))):
        c = cache.clone()
        q, k, _ = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, c, slots, *weights, **kernel, backend="numba")
        runs[name] = [x.view(torch.uint8) for x in (q, k, c)]
    for other in ("warp", "block"):
        assert all(torch.equal(a, b) for a, b in zip(runs["vec"], runs[other])), other
    assert not torch.equal(runs["vec"][2], cache.view(torch.uint8))  # it stored something (the others alike)
    ref_cache = cache.clone()
    want_q, want_k, _ = qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, ref_cache, slots, *weights)
    if not fp8:
        torch.testing.assert_close(runs["vec"][0].view(torch.bfloat16).view(want_q.shape), want_q,
                                   **TOL[torch.bfloat16])


def test_the_word_wide_kernel_takes_bf16_at_head_size_128_only():
    from kernels.qkv_prep import vec_supported

    assert [vec_supported(torch.bfloat16, d) for d in (64, 128, 256)] == [False, True, False]
    assert not vec_supported(torch.float16, 128) and not vec_supported(torch.float32, 128)
