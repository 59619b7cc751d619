"""The tensor-core flash-attention kernel (issue 17): ``kernels.flash_attention_mma`` against SDPA in fp32.

On a CPU: the kernel's source runs in numba's CUDA simulator with ``kernels._mma``'s stand-ins for the tensor-core
instruction (built from its documented fragment layout: an independent statement of what each lane holds), on
shapes small enough for a simulator -- one warp per block, a prompt over cached context across two key tiles,
bf16 and fp16, causal and not; the four kernels (bf16/fp16 x head_dim 64/128) compile and link for every supported
GPU (sm_80-sm_90: ``tests/test_01_compile.py`` builds every module's ``SIGNATURES``).
On a GPU (marked ``gpu``): packed variable-length batches with GQA, causal (end-aligned: fewer queries than keys,
as after a prefix hit) and not, lengths that end inside a tile, one-token sequences; the answer key is
``flash_attention_ref`` (SDPA per sequence in fp32 on the same bf16/fp16 inputs).
"""

import pytest
import torch

import kernels.flash_attention_mma as fm
from kernels._env import simulator_enabled
from kernels.flash_attention import flash_attention_ref

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_every_dtype_and_head_dim_has_a_kernel_with_a_signature():
    defaults = {(dt, d, False, 4) for dt in (torch.bfloat16, torch.float16) for d in fm.HEAD_DIMS}
    pipelined = {(torch.bfloat16, d, True, fm.WARPS) for d in fm.HEAD_DIMS}  # fp16 ones are built on first use
    assert defaults | pipelined <= set(fm.KERNELS)
    # kernels._ptx compiles each for every GPU
    assert {fm.KERNELS[key] for key in defaults | pipelined} <= set(fm.SIGNATURES)


def test_bad_shapes_get_a_clear_error():
    q = torch.zeros(4, 2, 32, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        fm.flash_attention_mma(q, q[:, :1], q[:, :1], cu, cu)
    q = torch.zeros(4, 3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple"):
        fm.flash_attention_mma(q, q[:, :2], q[:, :2], cu, cu)


simulator = pytest.mark.skipif(not simulator_enabled(), reason="the CUDA simulator's check (a machine without a GPU)")


@simulator
@pytest.mark.parametrize("pipelined", [False, True], ids=["load-then-compute", "pipelined"])
@pytest.mark.parametrize("dtype, causal", [(torch.bfloat16, True), (torch.float16, False)], ids=["bf16-causal", "fp16"])
def test_the_kernel_in_the_simulator(monkeypatch, dtype, causal, pipelined):
    """16 new queries after 54 cached keys (end-aligned causal: the first query sees 55 keys, the last all 70), so
    two key tiles, the second partly past the end; GQA (2 query heads over 1 kv head). Non-causal: 9 queries.
    Both layouts: the pipelined one's ``ldmatrix`` and ``cp.async`` run as ``kernels._mma``'s stand-ins."""
    monkeypatch.setattr(fm, "WARPS", 1)  # 32 threads a block: the simulator's barriers cost per thread
    g = torch.Generator().manual_seed(3)
    q_len = 16 if causal else 9
    q = torch.randn(q_len, 2, 64, generator=g).to(dtype)
    k, v = (torch.randn(70, 1, 64, generator=g).to(dtype) for _ in range(2))
    cu_q, cu_k = torch.tensor([0, q_len], dtype=torch.int32), torch.tensor([0, 70], dtype=torch.int32)
    got = fm.flash_attention_mma(q, k, v, cu_q, cu_k, causal=causal, pipelined=pipelined)
    want = flash_attention_ref(q, k, v, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


def batch(q_lens, k_lens, heads, kv_heads, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(sum(k_lens), kv_heads, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(sum(k_lens), kv_heads, d, device="cuda", dtype=dtype, generator=g)
    cu = [torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
          for lens in (q_lens, k_lens)]
    return q, k, v, *cu


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pipelined", [False, True], ids=["load-then-compute", "pipelined"])
def test_varlen_batches_match_sdpa(dtype, d, causal, pipelined):
    q_lens = [1, 63, 64, 65, 200, 7]
    k_lens = [1, 63, 64, 130, 200, 300] if causal else [5, 63, 64, 130, 17, 300]  # causal: some keys cached
    q, k, v, cu_q, cu_k = batch(q_lens, k_lens, 8, 2, d, dtype)
    got = fm.flash_attention_mma(q, k, v, cu_q, cu_k, causal=causal, pipelined=pipelined)
    want = flash_attention_ref(q, k, v, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("pipelined", [False, True], ids=["load-then-compute", "pipelined"])
def test_long_prefill_matches_sdpa(n, pipelined):
    q, k, v, cu_q, cu_k = batch([n], [n], 16, 8, 128, torch.bfloat16, seed=n)
    got = fm.flash_attention_mma(q, k, v, cu_q, cu_k, max_seqlen_q=n, pipelined=pipelined)
    want = flash_attention_ref(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
def test_the_engine_prefills_with_it_under_the_numba_backend():
    """``attention_backend="numba"``: the engine's prefill steps (a prefix hit included: cached keys gathered from
    the pages) run this kernel, and give the logits of the default backend (PyTorch's FlashAttention-2)."""
    from dataclasses import replace

    from bench.models import TINY
    from minivllm.engine import LLMEngine
    from minivllm.model.layers import launcher
    from minivllm.sampling_params import SamplingParams

    config = replace(TINY, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    prompts = [list(range(1, 150)), list(range(1, 100)) + [7, 8, 9], [5] * 40]  # the second shares 99 tokens
    logits = {}
    for backend in ("auto", "numba"):
        e = LLMEngine(model=config, device="cuda", dtype="bfloat16", max_model_len=512, attention_backend=backend,
                      num_kv_blocks=128, enable_prefix_caching=True, cuda_graph_max_tokens=0)
        calls = []
        ours = fm.flash_attention_mma
        if backend == "numba":  # count the calls (the engine finds the kernel through its cached launcher)
            fm.flash_attention_mma = lambda *a, **kw: calls.append(1) or ours(*a, **kw)
            launcher.cache_clear()
        seen = []
        compute = e.model.compute_logits
        e.model.compute_logits = lambda h: seen.append(compute(h).float()) or seen[-1]
        try:
            for p in prompts:  # one at a time: the second is a prefix hit
                e.add_request(p, SamplingParams(temperature=0, max_tokens=1))
                while e.has_unfinished_requests():
                    e.step()
        finally:
            fm.flash_attention_mma = ours
            launcher.cache_clear()
        logits[backend] = torch.cat(seen)
        if backend == "numba":
            assert len(calls) == len(prompts) * config.num_hidden_layers
        assert any(rec.num_cached_prefill_tokens for rec in e.step_log)
    torch.testing.assert_close(logits["numba"], logits["auto"], atol=0.05, rtol=0.02)
