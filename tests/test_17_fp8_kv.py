"""An fp8 (e4m3) KV cache: the conversions, the KV store and decode attention against PyTorch's own float8.

``kernels._fp8`` converts with integer work on the bits; the answer key is ``torch.float8_e4m3fn`` (PyTorch's
conversions, ties to even). Our store saturates at +-448 where PyTorch's cast gives NaN, so the reference clamps
first. Decode attention over an fp8 pool is checked against the dense reference reading the same bytes
(``paged_attention_ref`` widens them with PyTorch), in the simulator, and on a GPU at Qwen3's shapes.
"""

import numpy as np
import pytest
import torch
from numba import cuda

from kernels._fp8 import E4M3_MAX, UNPACK_SCALE, e4m3_byte, e4m3x4_halves_over256, e4m3x4_over256, f16x2_of, hfma2
from kernels._launch import launch, resolve_backend
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_warp import paged_attention_warp

FP8 = torch.float8_e4m3fn


@cuda.jit
def _encode(x, out):
    i = cuda.grid(1)
    while i < x.size:
        out[i] = e4m3_byte(x[i])
        i += cuda.gridsize(1)


@cuda.jit
def _decode(words, out):
    i = cuda.grid(1)
    while i < words.size:
        a, b, c, d = e4m3x4_over256(words[i])
        out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3] = a, b, c, d
        i += cuda.gridsize(1)


@cuda.jit
def _halves(words, out):
    i = cuda.grid(1)
    while i < words.size:
        out[2 * i], out[2 * i + 1] = e4m3x4_halves_over256(words[i])
        i += cuda.gridsize(1)


@cuda.jit
def _fma_pairs(a, b, c, x, y, out, packed):
    i = cuda.grid(1)
    while i < a.size:
        out[i] = hfma2(a[i], b[i], c[i])
        packed[i] = f16x2_of(x[2 * i], x[2 * i + 1]) if y[i] == 0 else f16x2_of(x[2 * i], x[2 * i])
        i += cuda.gridsize(1)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(kernel, blocks, threads, *args):
    launch(kernel, blocks, threads, *args, backend=resolve_backend("numba", *args))


def test_every_byte_widens_to_pytorchs_value():
    """All 256 codes: normals, subnormals, both zeros (NaN codes excepted: NaN != NaN)."""
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.zeros(256, dtype=torch.float32, device=_device())
    _run(_decode, 2, 32, codes.view(torch.int32).to(_device()), out)
    want = codes.view(FP8).float()
    finite = ~want.isnan()
    assert finite.sum() == 254
    torch.testing.assert_close(out.cpu()[finite] * UNPACK_SCALE, want[finite], atol=0, rtol=0)


def test_every_byte_widens_to_an_fp16_pair_of_pytorchs_value_over_256():
    """The fp16-pair widening (bytes 0 and 2 in one pair, 1 and 3 in the other): exact for every code."""
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.zeros(128, dtype=torch.int32, device=_device())
    _run(_halves, 2, 32, codes.view(torch.int32).to(_device()), out)
    got = out.cpu().view(torch.float16).float().view(64, 2, 2)  # word, pair, half
    got = torch.stack([got[:, 0, 0], got[:, 1, 0], got[:, 0, 1], got[:, 1, 1]], 1).flatten() * UNPACK_SCALE
    want = codes.view(FP8).float()
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite], want[finite], atol=0, rtol=0)


def test_fp16_pair_multiply_add_rounds_once_like_pytorch():
    """``hfma2``: each half is a*b + c rounded once to fp16 (the answer key: the same sum in fp64, then rounded);
    ``f16x2_of``: fp32 to fp16 pairs, to nearest."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(512, generator=g).half() * s for s in (3.0, 0.5, 2.0))
    x = torch.randn(512, generator=g) * 100
    y = (torch.arange(256) % 2).to(torch.int32)
    out, packed = (torch.zeros(256, dtype=torch.int32, device=_device()) for _ in range(2))
    args = [t.view(torch.int32).to(_device()) for t in (a, b, c)] + [x.to(_device()), y.to(_device()), out, packed]
    _run(_fma_pairs, 2, 64, *args)
    want = (a.double() * b.double() + c.double()).half()
    assert torch.equal(out.cpu().view(torch.float16), want)
    pairs = x.view(256, 2).clone()
    pairs[y == 1, 1] = pairs[y == 1, 0]
    assert torch.equal(packed.cpu().view(torch.float16), pairs.flatten().half())


def test_rounding_matches_pytorch_including_ties_and_subnormals():
    g = torch.Generator().manual_seed(0)
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = codes[~codes.isnan()].unique()  # every representable value, sorted
    ties = (grid[1:] + grid[:-1]) / 2  # exactly halfway: ties to even
    x = torch.cat([grid, ties, torch.randn(2000, generator=g) * 40, torch.randn(1000, generator=g) * 0.01,
                   torch.tensor([0.0, -0.0, 2.0 ** -10, -(2.0 ** -9) * 1.5])]).float()
    out = torch.zeros(x.numel(), dtype=torch.int32, device=_device())
    _run(_encode, 4, 64, x.to(_device()), out)
    want = x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8).view(torch.uint8).to(torch.int32)
    bad = out.cpu() != want
    assert not bad.any(), f"{int(bad.sum())} values differ, e.g. {x[bad][:5].tolist()}"


def test_out_of_range_saturates_and_nan_stays_nan():
    x = torch.tensor([448.0, 460.0, 1e6, float("inf"), -500.0, float("-inf"), float("nan")])
    out = torch.zeros(x.numel(), dtype=torch.int32, device=_device())
    _run(_encode, 1, 8, x.to(_device()), out)
    assert out.cpu().tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7F]


def _fp8_case(seqs, q_heads, kv_heads, dim, max_len, device="cpu", seed=0, block_size=16, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (seqs,), generator=g)
    width = -(-int(lens.max()) // block_size)
    num_blocks = seqs * width + 3
    tables = torch.randperm(num_blocks, generator=g)[: seqs * width].view(seqs, width).to(torch.int32)
    cache = (spread * torch.randn(num_blocks, 2, block_size, kv_heads, dim, generator=g)).to(FP8)
    q = torch.randn(seqs, q_heads, dim, generator=g).to(torch.bfloat16)
    return q.to(device), cache.to(device), tables.to(device), lens.to(torch.int32).to(device)


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(2, 1, 128), (3, 1, 64)])
def test_fp8_decode_matches_reference_in_the_simulator(q_heads, kv_heads, dim):
    """16 e4m3 values per lane (twice the tokens per warp of bf16); values spread over subnormals to ~100."""
    q, cache, tables, lens = _fp8_case(2, q_heads, kv_heads, dim, max_len=21, seed=dim, block_size=4, spread=8.0)
    lens[0] = 1  # one token: a single lane group of one warp sees it
    got = paged_attention_warp(q, cache, tables, lens, warps=2, unroll=2, fp8_half2=False)
    torch.testing.assert_close(got.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=2e-2, rtol=2e-2)


def test_fp8_decode_by_the_hardware_conversion_in_the_simulator():
    """The sm_89+ variant (``cvt.rn.f16x2.e4m3x2``; a PyTorch stand-in here): true values, no factor of 256."""
    q, cache, tables, lens = _fp8_case(2, 2, 1, 128, max_len=21, seed=4, block_size=4, spread=8.0)
    got = paged_attention_warp(q, cache, tables, lens, warps=2, unroll=2, fp8_cvt=True, fp8_half2=False)
    torch.testing.assert_close(got.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("cvt", [False, True])
@pytest.mark.parametrize("q_heads,kv_heads,dim", [(2, 1, 128), (3, 1, 64)])
def test_fp8_decode_in_fp16_pairs_in_the_simulator(cvt, q_heads, kv_heads, dim):
    """``fp8_half2`` (the default): scores and a trip's weighted values multiply-added as fp16 pairs, both
    widenings. fp16 sums keep ~11 bits: the error is measured against the largest value, |V| up to ~30 here
    (observed: 0.2-0.45% of it, against 0.01% for fp32 arithmetic)."""
    q, cache, tables, lens = _fp8_case(2, q_heads, kv_heads, dim, max_len=21, seed=dim + 1, block_size=4, spread=8.0)
    got = paged_attention_warp(q, cache, tables, lens, warps=2, unroll=2, fp8_cvt=cvt, fp8_half2=True)
    want = paged_attention_ref(q, cache, tables, lens).float()
    vmax = cache[:, 1].float().abs().max().item()
    assert (got.float() - want).abs().max().item() <= 8e-3 * vmax


def test_fp8_decode_split_k_in_the_simulator():
    q, cache, tables, lens = _fp8_case(2, 2, 1, 64, max_len=40, seed=3)
    got = paged_attention_warp(q, cache, tables, lens, warps=2, tokens_per_split=12)
    torch.testing.assert_close(got.float(), paged_attention_ref(q, cache, tables, lens).float(), atol=2e-2, rtol=2e-2)


def test_fp8_cache_errors_are_clear():
    q, cache, tables, lens = _fp8_case(1, 2, 1, 64, max_len=5)
    with pytest.raises(TypeError, match="kv_cache must have dtype"):
        paged_attention_warp(q.float(), cache, tables, lens)  # fp8 pools take bf16 queries
    q, cache, tables, lens = _fp8_case(1, 2, 1, 40, max_len=5)
    with pytest.raises(ValueError, match="head_dim / 16"):
        paged_attention_warp(q, cache, tables, lens)


@pytest.mark.gpu
@pytest.mark.parametrize("seqs,max_len", [(64, 3000), (3, 32768), (256, 600)])
def test_fp8_decode_on_gpu(seqs, max_len):
    q, cache, tables, lens = _fp8_case(seqs, 16, 8, 128, max_len, device="cuda", seed=seqs)
    ref = paged_attention_ref(q, cache, tables, lens).float()
    widenings = (False, True) if torch.cuda.get_device_capability() >= (8, 9) else (False,)
    for cvt in widenings:  # masks and shifts; the hardware's conversion where the GPU has it
        for half2 in (False, True):  # fp32 arithmetic; fp16 pairs
            got = paged_attention_warp(q, cache, tables, lens, fp8_cvt=cvt, fp8_half2=half2)
            torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
            graphed = paged_attention_warp(q, cache, tables, lens, max_context_len=max_len, fp8_cvt=cvt,
                                           fp8_half2=half2)  # as in a graph
            torch.testing.assert_close(graphed.float(), ref, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- the KV store
def test_store_kv_rounds_into_an_fp8_pool_like_pytorch():
    from kernels.store_kv import store_kv, store_kv_ref

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        key, value = ((40 * torch.randn(5, 2, 16, generator=g)).to(dtype) for _ in range(2))
        key[0, 0, 0] = 1000.0  # past e4m3's range: saturates at 448
        slots = torch.tensor([3, -1, 0, 15, 7])
        got, want = (torch.zeros(4, 2, 4, 2, 16, dtype=FP8) for _ in range(2))
        store_kv(key, value, got, slots, backend="numba")
        store_kv_ref(key, value, want, slots)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert got.float().abs().max() == E4M3_MAX and got[0, 0, 3].float().abs().sum() > 0


def _qkv_prep_case(seed: int, q_heads: int, kv_heads: int, d: int):
    """3 tokens of qkv (bf16), QK-norm weights, RoPE table, positions, slots (one -1), and two empty fp8 pools."""
    from kernels.rope import rope_cache

    g = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(3, (q_heads + 2 * kv_heads) * d, generator=g)).to(torch.bfloat16)
    qw, kw = ((1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16) for _ in range(2))
    pools = tuple(torch.zeros(4, 2, 4, kv_heads, d, dtype=FP8) for _ in range(2))
    return qkv, qw, kw, rope_cache(d, 64, 1e6), torch.tensor([0, 17, 63]), torch.tensor([5, -1, 9]), pools


def test_fused_qkv_prep_stores_e4m3_keys_and_values():
    """QK-norm, RoPE, then the key (rounded to bf16 as written to k) and the value rounded to e4m3."""
    from kernels.qkv_prep import qkv_prep, qkv_prep_ref

    q_heads, kv_heads = 4, 2
    qkv, qw, kw, cos_sin, positions, slots, (got, want) = _qkv_prep_case(2, q_heads, kv_heads, 16)
    ref = qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, want, slots, qw, kw)
    out = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, got, slots, qw, kw, backend="numba")
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and got.float().abs().sum() > 0
    torch.testing.assert_close(out[0], ref[0], atol=0, rtol=0)  # q is untouched by the cache's dtype


def test_the_warp_per_head_qkv_prep_stores_e4m3_like_the_block_kernel():
    from kernels.qkv_prep import qkv_prep

    qkv, qw, kw, cos_sin, positions, slots, (warp, block) = _qkv_prep_case(3, 2, 1, 64)
    qkv_prep(qkv, 2, 1, positions, cos_sin, warp, slots, qw, kw, warp=True, backend="numba")
    qkv_prep(qkv, 2, 1, positions, cos_sin, block, slots, qw, kw, warp=False, backend="numba")
    same = (warp.view(torch.uint8) == block.view(torch.uint8)).float().mean()
    assert same > 0.99 and warp.float().abs().sum() > 0  # sums of squares in another order: a rare other rounding


# ----------------------------------------------------------------------------- the engine
def test_kv_cache_dtype_is_validated():
    from minivllm.config import EngineConfig

    assert EngineConfig(device="cpu", kv_cache_dtype="fp8").torch_kv_cache_dtype == FP8
    assert EngineConfig(device="cpu", dtype="bfloat16").torch_kv_cache_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(device="cpu", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="learner"):
        EngineConfig(device="cpu", kv_cache_dtype="fp8", learner=True)


@pytest.fixture(scope="module")
def default_answers():
    """The default model's greedy answers (fp32, on the CPU) with an fp8 cache, and with its own fp32 cache into
    which every K and V is stored rounded to e4m3 by PyTorch (then widened back): the answer key. Both read the
    cache through the same attention code (``attention_backend="torch"``), so any difference is the fp8 cache's
    own doing. The second question is asked again: its prompt is then read back from the cache."""
    from minivllm import LLM, SamplingParams
    from minivllm.model import paged_attention as pa

    convs = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "What is 12 times 12?",
                                                       "Name three primary colours.",
                                                       "Write one sentence about the Moon.")]
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=0)
    store, answers = pa.store, {}
    for kv_cache_dtype in ("fp8", "auto"):
        llm = LLM(dtype="float32", num_kv_blocks=96, max_num_batched_tokens=64, attention_backend="torch",
                  kv_cache_dtype=kv_cache_dtype)
        if kv_cache_dtype == "auto":  # the answer key: e4m3 values in the fp32 cache
            pa.store = lambda k, v, layer, meta: store(*(x.clamp(-E4M3_MAX, E4M3_MAX).to(FP8).to(x.dtype)
                                                         for x in (k, v)), layer, meta)
        try:
            outs = [o.outputs[0] for o in llm.chat(convs, params, use_tqdm=False) + llm.chat(convs[1:2], params,
                                                                                               use_tqdm=False)]
        finally:
            pa.store = store
        llm.engine.check_no_leaks()
        answers[kv_cache_dtype] = (outs, llm)
    return answers


def test_fp8_cache_holds_a_quarter_of_fp32s_bytes(default_answers):
    fp8, exact = default_answers["fp8"][1].engine.kv_cache, default_answers["auto"][1].engine.kv_cache
    assert fp8.dtype == FP8 and exact.dtype == torch.float32 and exact.num_blocks == fp8.num_blocks
    assert fp8.nbytes * 4 == exact.nbytes


def test_fp8_cache_equals_an_exact_cache_of_e4m3_rounded_values(default_answers):
    """Token for token and log-probability for log-probability: the fp8 cache changes what is stored, nothing
    else. (How far that takes answers from the exact cache's: bench/kv_cache_quality.py.)"""
    fp8, want = default_answers["fp8"][0], default_answers["auto"][0]
    assert [o.token_ids for o in fp8] == [o.token_ids for o in want]
    assert [o.logprobs for o in fp8] == [o.logprobs for o in want]
    assert fp8[4].token_ids == fp8[1].token_ids  # the repeated question, its prompt read back from the cache
    assert default_answers["fp8"][1].engine.stats["cached_prompt_tokens"] >= 16


@pytest.mark.gpu
def test_fp8_store_kernels_on_gpu_at_qwen3_shapes():
    from kernels.qkv_prep import qkv_prep, qkv_prep_ref
    from kernels.rope import rope_cache

    g = torch.Generator().manual_seed(3)
    tokens, q_heads, kv_heads, d = 300, 16, 8, 128
    cos_sin = rope_cache(d, 4096, 1e6, device="cuda")
    qkv = (3 * torch.randn(tokens, (q_heads + 2 * kv_heads) * d, generator=g)).to(torch.bfloat16).cuda()
    qw, kw = ((1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16).cuda() for _ in range(2))
    positions = torch.randint(0, 4096, (tokens,), generator=g).cuda()
    slots = torch.randperm(64 * 16, generator=g)[:tokens].cuda()
    got, want = (torch.zeros(64, 2, 16, kv_heads, d, dtype=FP8, device="cuda") for _ in range(2))
    qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, want, slots, qw, kw)
    qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, got, slots, qw, kw)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


BF16_LOGIT_TOL = 0.25  # four bf16 steps of a logit between 8 and 16


def greedy_steps_agree(ours: tuple, ref: tuple, tol: float = BF16_LOGIT_TOL) -> int:
    """``ours`` and ``ref``: (token ids, per-step {token: logprob}) of one greedy sequence from two paths. Every
    step up to the first different token has the same inputs in both: there each logprob both report must agree
    within ``tol``, and at that first difference our token must be within ``tol`` of the reference's own choice,
    in the reference's logits (a near tie, not an error). Returns how many steps were compared."""
    (a, la), (b, lb) = ours, ref
    first = next((t for t in range(len(a)) if a[t] != b[t]), len(a))
    for t in range(min(first + 1, len(a))):
        gaps = {k: abs(la[t][k] - lb[t][k]) for k in la[t].keys() & lb[t].keys()}
        assert gaps and max(gaps.values()) <= tol, (t, la[t], lb[t])
    if first < len(a):
        assert a[first] in lb[first] and lb[first][b[first]] - lb[first][a[first]] <= tol, (first, la[first], lb[first])
    return min(first + 1, len(a))


def test_greedy_steps_agree_takes_near_ties_and_refuses_errors():
    """The rule above on the H100's measured first difference (sequence 0: the torch path preferred 85 by one bf16
    step; ours 173 by one step), and on what a real error would look like."""
    same = ([5, 6], [{5: -0.5, 6: -1.0}, {6: -0.2, 7: -1.9}])
    assert greedy_steps_agree(same, same) == 2
    ours = ([5, 173, 9], [{5: -0.5}, {173: -0.9344, 85: -0.9969}, {9: -0.1}])
    ref = ([5, 85, 4], [{5: -0.52}, {85: -0.9296, 173: -0.9921}, {4: -0.3}])
    assert greedy_steps_agree(ours, ref) == 2  # the third step had other inputs: not compared
    with pytest.raises(AssertionError):  # the same tokens, logprobs 0.6 apart: an error, not rounding
        greedy_steps_agree(([5, 6], [{5: -0.5}, {6: -0.2}]), ([5, 6], [{5: -0.5}, {6: -0.8}]))
    with pytest.raises(AssertionError):  # a different pick that the reference ranks 1.0 lower
        greedy_steps_agree(([5, 7], [{5: -0.5}, {7: -0.3, 6: -0.4}]), ([5, 6], [{5: -0.5}, {6: -0.3, 7: -1.3}]))


@pytest.mark.gpu
def test_fp8_engine_on_gpu_equals_its_torch_path():
    """A small random Qwen3 (weights spread wide, as a trained model's are) with an fp8 cache on the GPU: our
    kernels (fused store, the fp8 decode kernel, CUDA graphs for decode and prefill) against the torch path (PyTorch
    rounds, gathers and widens the same bytes), step by step while both have the same inputs; then the cache is
    empty again. The model runs in bf16, whose logits of 8-16 are 0.0625 apart: the two paths round differently by
    a step or two, so a greedy pick between near-tied logits may differ (measured on an H100: |d logprob| <= 0.18
    up to each first difference, and each difference a tie or one step in the torch path's own logits, with fp16-pair
    or fp32 arithmetic alike). Every step up to a sequence's first different token is compared."""
    from minivllm import LLM, SamplingParams
    from minivllm.model.config import ModelConfig

    cfg = ModelConfig(architecture="qwen3", vocab_size=256, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                      max_position_embeddings=1024, qk_norm=True, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 40, 300, 41)]
    prompts[3][:40] = prompts[1]  # a cached prefix: its keys are read back from the fp8 cache
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    answers = []
    for backend in ("auto", "torch"):
        llm = LLM(cfg, device="cuda", kv_cache_dtype="fp8", num_kv_blocks=128, attention_backend=backend,
                  enforce_eager=backend == "torch")
        torch.manual_seed(0)
        with torch.no_grad():
            for p in llm.engine.model.parameters():  # in place: captured graphs stay valid
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        outs = llm.generate(prompts, params, use_tqdm=False)
        answers.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs])
        assert llm.engine.kv_cache.dtype == FP8
        llm.engine.check_no_leaks()
    compared = [greedy_steps_agree(ours, ref) for ours, ref in zip(*answers)]
    assert sum(compared) >= 40, compared  # most of the 96 steps had the same inputs in both paths
