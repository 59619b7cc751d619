"""Phase 07: prefill attention (kernels.flash_attention), dense and over the paged KV pool.

The answer key is a brute-force float64 attention written here (scores, an explicit mask built by index
comparison, softmax, weighted sum), independent of the module's SDPA-based references. The references are
checked against it on randomized variable-length batches (lengths 1...300, GQA ratios 1/2/3/8); the numba
kernels run in the simulator on tiny batches (it is slow) and on the GPU in the ``gpu`` tests.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from kernels import flash_attention as fa
from kernels._env import simulator_enabled

needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the kernels in numba's CUDA simulator")
gpu = pytest.mark.gpu
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


# ----------------------------------------------------------------------------- the answer key
def key(q, k, v, q_lens, k_lens, scale=None, causal=True) -> torch.Tensor:
    """float64 brute force, one sequence and one query head at a time."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    qo = ko = 0
    for ql, kl in zip(q_lens, k_lens):
        for h in range(q.shape[1]):
            qs = q[qo:qo + ql, h].double()
            ks, vs = k[ko:ko + kl, h // group].double(), v[ko:ko + kl, h // group].double()
            s = qs @ ks.T * scale  # (ql, kl)
            if causal:
                for i in range(ql):
                    s[i, i + (kl - ql) + 1:] = float("-inf")  # query i is the (kl - ql + i)-th token
            out[qo:qo + ql, h] = torch.softmax(s, dim=-1) @ vs
        qo, ko = qo + ql, ko + kl
    return out


def cu(lens: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def dense_case(q_lens, k_lens, n_q, n_kv, head_dim, dtype=torch.float32, device="cpu"):
    q = torch.randn(sum(q_lens), n_q, head_dim, device=device).to(dtype)
    k = torch.randn(sum(k_lens), n_kv, head_dim, device=device).to(dtype)
    v = torch.randn(sum(k_lens), n_kv, head_dim, device=device).to(dtype)
    return q, k, v, cu(q_lens, device), cu(k_lens, device)


def paged_case(q_lens, ctx_lens, n_q, n_kv, head_dim, block_size, dtype=torch.float32, device="cpu", rng=None):
    """A pool with the contexts in shuffled, non-contiguous blocks (and spare blocks), plus the dense k, v."""
    rng = rng or random.Random(0)
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + 3
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    pool = torch.randn(num_blocks, 2, block_size, n_kv, head_dim, device=device).to(dtype)
    tables = torch.full((len(ctx_lens), max(need) + 1), -1, dtype=torch.int32)  # padded with -1: never read
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([physical.pop() for _ in range(n)], dtype=torch.int32)
    ks, vs = [], []
    for b, c in enumerate(ctx_lens):
        kv = pool[tables[b, :need[b]].long()]
        ks.append(kv[:, 0].flatten(0, 1)[:c])
        vs.append(kv[:, 1].flatten(0, 1)[:c])
    q = torch.randn(sum(q_lens), n_q, head_dim, device=device).to(dtype)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return q, pool, cu(q_lens, device), tables.to(device), ctx, torch.cat(ks), torch.cat(vs)


def _close(got, want, dtype):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOL[dtype])


GQA = [(2, 2), (4, 2), (3, 1), (8, 1)]  # (n_q_heads, n_kv_heads): ratios 1, 2, 3, 8


# ----------------------------------------------------------------------------- references, large random batches
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("n_q", "n_kv"), GQA)
def test_dense_reference_matches_the_key_on_random_varlen_batches(n_q, n_kv, causal):
    rng = random.Random(n_q * 10 + n_kv + causal)
    q_lens = [rng.randint(1, 300) for _ in range(3)]
    k_lens = [ql + rng.choice([0, 0, rng.randint(1, 40)]) for ql in q_lens]  # some with earlier context
    q, k, v, cq, ck = dense_case(q_lens, k_lens, n_q, n_kv, 64)
    _close(fa.flash_attention_ref(q, k, v, cq, ck, causal=causal), key(q, k, v, q_lens, k_lens, causal=causal),
           torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_reference_rounds_once_in_low_precision(dtype):
    q, k, v, cq, ck = dense_case([7, 130], [7, 130], 4, 2, 128, dtype)
    got = fa.flash_attention_ref(q, k, v, cq, ck)
    assert got.dtype == dtype
    _close(got, key(q, k, v, [7, 130], [7, 130]), dtype)


@pytest.mark.parametrize(("n_q", "n_kv"), GQA)
def test_paged_reference_matches_the_key_on_shuffled_block_tables(n_q, n_kv):
    rng = random.Random(n_q + 7 * n_kv)
    ctx_lens = [rng.randint(1, 300) for _ in range(3)]
    q_lens = [rng.randint(1, c) for c in ctx_lens]
    q, pool, cq, tables, ctx, k, v = paged_case(q_lens, ctx_lens, n_q, n_kv, 64, 16, rng=rng)
    got = fa.flash_attention_paged_ref(q, pool, cq, tables, ctx)
    _close(got, key(q, k, v, q_lens, ctx_lens), torch.float32)


def test_merging_the_softmax_states_of_two_parts_gives_the_whole_row():
    s = torch.randn(4, 11, dtype=torch.float64) * 5
    s[0, 6:] = float("-inf")  # row 0 sees no key of the second part
    v = torch.randn(11, 3, dtype=torch.float64)

    def state(part, vals):
        m = part.max(-1).values
        p = torch.exp(part - torch.where(torch.isinf(m), 0.0, m)[:, None])
        return m, p.sum(-1), p @ vals

    m, l, o = fa.merge_softmax_states(state(s[:, :6], v[:6]), state(s[:, 6:], v[6:]))
    torch.testing.assert_close(o / l[:, None], torch.softmax(s, -1) @ v)
    torch.testing.assert_close(m, s.max(-1).values)


def test_a_single_query_with_one_key_returns_its_value():
    q, k, v, cq, ck = dense_case([1], [1], 2, 1, 8)
    torch.testing.assert_close(fa.flash_attention_ref(q, k, v, cq, ck), v.expand(1, 2, 8))


# ----------------------------------------------------------------------------- the kernels, in the simulator
@needs_sim
@pytest.mark.parametrize(("n_q", "n_kv"), GQA)
def test_dense_kernel_on_random_tiny_batches(n_q, n_kv):
    rng = random.Random(100 + n_q)
    batch = 1 if n_q == 8 else 2
    q_lens = [rng.randint(1, 20) for _ in range(batch)]
    k_lens = [ql + rng.randint(0, 6) for ql in q_lens]
    q, k, v, cq, ck = dense_case(q_lens, k_lens, n_q, n_kv, 16)
    got = fa.flash_attention(q, k, v, cq, ck, backend="numba")
    _close(got, key(q, k, v, q_lens, k_lens), torch.float32)


@needs_sim
def test_dense_kernel_over_several_query_and_key_tiles():
    q_lens, k_lens = [40, 17], [45, 17]  # 3 query tiles of 16 rows, 3 key tiles of 16 keys in the simulator
    q, k, v, cq, ck = dense_case(q_lens, k_lens, 1, 1, 8)
    got = fa.flash_attention(q, k, v, cq, ck, backend="numba")
    _close(got, key(q, k, v, q_lens, k_lens), torch.float32)


@needs_sim
def test_dense_kernel_without_the_causal_mask_and_a_custom_scale():
    q_lens, k_lens = [3, 18], [9, 5]  # non-causal: any lengths, fewer keys than queries included
    q, k, v, cq, ck = dense_case(q_lens, k_lens, 2, 1, 8)
    got = fa.flash_attention(q, k, v, cq, ck, causal=False, scale=0.3, backend="numba")
    _close(got, key(q, k, v, q_lens, k_lens, scale=0.3, causal=False), torch.float32)


@needs_sim
@pytest.mark.parametrize(("dtype", "head_dim"), [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 128)])
def test_dense_kernel_dtypes_and_qwen_head_dims(dtype, head_dim):
    q, k, v, cq, ck = dense_case([5], [9], 2, 1, head_dim, dtype)
    out = torch.empty_like(q)
    got = fa.flash_attention(q, k, v, cq, ck, out=out, backend="numba")
    assert got is out and got.dtype == dtype
    _close(got, key(q, k, v, [5], [9]), dtype)


@needs_sim
def test_causal_rows_never_see_later_keys():
    # changing keys and values after position p must not change the outputs of queries 0..p
    q, k, v, cq, ck = dense_case([20], [20], 1, 1, 8)
    before = fa.flash_attention(q, k, v, cq, ck, backend="numba")
    k2, v2 = k.clone(), v.clone()
    k2[12:], v2[12:] = 100.0, -100.0
    after = fa.flash_attention(q, k2, v2, cq, ck, backend="numba")
    assert torch.equal(before[:12], after[:12])
    assert not torch.allclose(before[12:], after[12:])


@needs_sim
@pytest.mark.parametrize(("n_q", "n_kv", "block_size"), [(2, 2, 4), (4, 2, 8), (3, 1, 4), (8, 1, 16)])
def test_paged_kernel_on_shuffled_non_contiguous_blocks(n_q, n_kv, block_size):
    rng = random.Random(n_q * block_size)
    batch = 1 if n_q == 8 else 2
    ctx_lens = [rng.randint(1, 30) for _ in range(batch)]
    q_lens = [rng.randint(1, min(c, 16)) for c in ctx_lens]  # prefix hits / chunks: q_len <= context
    q, pool, cq, tables, ctx, k, v = paged_case(q_lens, ctx_lens, n_q, n_kv, 16, block_size, rng=rng)
    got = fa.flash_attention_paged(q, pool, cq, tables, ctx, backend="numba")
    _close(got, key(q, k, v, q_lens, ctx_lens), torch.float32)


@needs_sim
def test_paged_kernel_bf16_and_a_whole_prompt_in_the_cache():
    q_lens = ctx_lens = [6, 3]  # no earlier context: the same answer as the dense path
    q, pool, cq, tables, ctx, k, v = paged_case(q_lens, ctx_lens, 2, 1, 64, 4, torch.bfloat16)
    got = fa.flash_attention_paged(q, pool, cq, tables, ctx, backend="numba")
    _close(got, key(q, k, v, q_lens, ctx_lens), torch.bfloat16)
    dense = fa.flash_attention(q, k.contiguous(), v.contiguous(), cq, cq, backend="numba")
    assert torch.equal(got, dense)


def test_empty_batch_and_torch_backend():
    q, k, v, cq, ck = dense_case([0], [0], 2, 1, 8)
    assert fa.flash_attention(q, k, v, cq, ck).shape == (0, 2, 8)
    q, k, v, cq, ck = dense_case([4, 2], [4, 5], 2, 1, 8)
    _close(fa.flash_attention(q, k, v, cq, ck, backend="torch"), key(q, k, v, [4, 2], [4, 5]), torch.float32)


def test_launch_config_keeps_the_simulator_small():
    rows, tile = fa.launch_config("simulator")
    assert rows <= 64 and tile <= fa.MAX_TILE_N
    rows, tile = fa.launch_config("gpu")
    assert rows % 32 == 0 and tile == fa.MAX_TILE_N


# ----------------------------------------------------------------------------- bad arguments
def test_bad_dense_arguments_raise_clear_errors():
    q, k, v, cq, ck = dense_case([3, 4], [3, 4], 4, 2, 8)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        fa.flash_attention(q[:, :3].contiguous(), k, v, cq, ck)
    with pytest.raises(TypeError, match="k must have dtype"):
        fa.flash_attention(q, k.half(), v.half(), cq, ck)
    with pytest.raises(ValueError, match="v must have shape"):
        fa.flash_attention(q, k, v[:-1], cq, ck)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype in \\(int32\\)"):
        fa.flash_attention(q, k, v, cq.long(), ck)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 7 must equal the number of tokens \(6\)"):
        fa.flash_attention(q[:6], k, v, cq, ck)
    with pytest.raises(ValueError, match="never decrease"):
        fa.flash_attention(q, k, v, torch.tensor([0, 5, 3, 7], dtype=torch.int32), ck)
    with pytest.raises(ValueError, match="same batch"):
        fa.flash_attention(q, k, v, cq, torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        fa.flash_attention(q, k, v, cq, torch.tensor([0, 2, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="head_dim must be"):
        fa.flash_attention(*dense_case([1], [1], 1, 1, 256)[:5])
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        fa.flash_attention(q[0], k, v, cq, ck)
    with pytest.raises(ValueError, match="out must have shape"):
        fa.flash_attention(q, k, v, cq, ck, out=torch.empty(7, 4, 4))
    with pytest.raises(ValueError, match="contiguous"):
        fa.flash_attention(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, cq, ck)


def test_bad_paged_arguments_raise_clear_errors():
    q, pool, cq, tables, ctx, _, _ = paged_case([2, 3], [5, 9], 2, 1, 8, 4)
    with pytest.raises(ValueError, match="kv_cache must have shape"):
        fa.flash_attention_paged(q, pool[:, :1].contiguous(), cq, tables, ctx)
    with pytest.raises(ValueError, match="block_tables must have shape"):
        fa.flash_attention_paged(q, pool, cq, tables[:1], ctx)
    with pytest.raises(ValueError, match="context_len must be >= its q_len"):
        fa.flash_attention_paged(q, pool, cq, tables, torch.tensor([5, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="too few for a context"):
        fa.flash_attention_paged(q, pool, cq, tables, torch.tensor([5, 99], dtype=torch.int32))
    bad = tables.clone()
    bad[1, 0] = pool.shape[0]
    with pytest.raises(ValueError, match=r"block_tables\[1\] points outside the pool"):
        fa.flash_attention_paged(q, pool, cq, bad, ctx)
    with pytest.raises(TypeError, match="context_lens must have dtype"):
        fa.flash_attention_paged(q, pool, cq, tables, ctx.long())


# ----------------------------------------------------------------------------- GPU
def _gpu_key(q, k, v, lens):
    """torch SDPA in fp32 on the bf16 inputs (the memory-efficient backend), causal, one sequence at a time.

    NOTE: not SDPA in bf16: its flash backend rounds the probabilities to bf16 before P @ V, and where a few large
    values of V cancel, that alone can pass the tolerance; our kernel accumulates in fp32, as this key does."""
    group = q.shape[1] // k.shape[1]
    out, start = torch.empty_like(q), 0
    for n in lens:
        s = slice(start, start + n)
        qs, ks, vs = (x[s].float().transpose(0, 1) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0),
                                           is_causal=True)
        out[s] = o.transpose(0, 1).to(q.dtype)
        start += n
    return out


@gpu
@pytest.mark.parametrize("lens", [[16384], [1, 300, 4097, 8000]])
def test_gpu_bf16_long_prefill_matches_sdpa(lens):
    torch.manual_seed(len(lens))
    q, k, v, cq, ck = dense_case(lens, lens, 16, 8, 128, torch.bfloat16, "cuda")  # Qwen3-0.6B's heads
    got = fa.flash_attention(q, k, v, cq, ck)
    torch.testing.assert_close(got.float(), _gpu_key(q, k, v, lens).float(), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize(("n_q", "n_kv", "head_dim"), [(16, 8, 128), (9, 3, 64), (8, 1, 128)])
def test_gpu_paged_prefill_with_context_matches_the_reference(n_q, n_kv, head_dim):
    rng = random.Random(n_q)
    ctx_lens = [rng.randint(1, 3000) for _ in range(6)]
    q_lens = [rng.randint(1, c) for c in ctx_lens]
    q, pool, cq, tables, ctx, k, v = paged_case(q_lens, ctx_lens, n_q, n_kv, head_dim, 16, torch.bfloat16,
                                                "cuda", rng)
    got = fa.flash_attention_paged(q, pool, cq, tables, ctx)
    want = fa.flash_attention_ref(q, k.contiguous(), v.contiguous(), cq, cu(ctx_lens, "cuda"))
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
