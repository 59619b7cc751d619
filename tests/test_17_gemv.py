"""kernels.gemv: small-batch matrix-vector products against ``F.linear`` in fp32 -- in numba's CUDA simulator on
a CPU (tiny shapes), and on a GPU at Qwen3-0.6B's shapes when there is one."""

import gc

import pytest
import torch

from kernels import gemv as g
from kernels._env import simulator_enabled

needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the kernel in numba's CUDA simulator")
gpu = pytest.mark.gpu


def _operands(tokens: int, n: int, k: int, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16).to(device)
    weight = (torch.randn(n, k, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    return x, weight


def _fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.double(), weight.double()).float()


@needs_sim
@pytest.mark.parametrize("tokens, n, k", [
    (1, 5, 64),  # 8 chunks: lanes 8..31 idle; 5 rows over 2 one-warp blocks: the grid-stride loop
    (3, 7, 512),  # 64 chunks = 2 per lane; 3 tokens written by lanes 0..2
    (2, 4, 72 * 8),  # 72 chunks: 3 per lane, the last partly idle
])
def test_gemv_matches_linear_in_the_simulator(tokens, n, k):
    x, weight = _operands(tokens, n, k)
    got = g.gemv(x, weight)
    want = _fp32(x, weight)
    assert got.shape == (tokens, n) and got.dtype == torch.bfloat16
    # one rounding to bf16 at the end: within half a bf16 ulp of the exact sum (plus fp32 summation order)
    assert torch.allclose(got.float(), want, rtol=2 ** -8, atol=1e-3), (got.float() - want).abs().max()
    assert not torch.equal(got, torch.zeros_like(got))


@needs_sim
def test_gemv_writes_into_out_and_each_token_its_own_row():
    x, weight = _operands(2, 3, 256)
    x[1] = -x[0]  # token 1's products are token 0's negated: a mix-up of lanes or rows shows
    out = torch.full((2, 3), 7.0, dtype=torch.bfloat16)
    assert g.gemv(x, weight, out=out) is out
    assert torch.equal(out[1], -out[0]) and torch.allclose(out[0].float(), _fp32(x, weight)[0], rtol=2 ** -8,
                                                           atol=1e-3)


def test_gemv_refuses_what_it_does_not_take():
    x, weight = _operands(1, 4, 64)
    with pytest.raises(TypeError, match="x must have dtype"):
        g.gemv(x.float(), weight)
    with pytest.raises(ValueError, match="1..8 tokens"):
        g.gemv(torch.zeros(9, 64, dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match="K % 8 == 0"):
        g.gemv(torch.zeros(1, 60, dtype=torch.bfloat16), torch.zeros(4, 60, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="equal to weight's"):
        g.gemv(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(4, 128, dtype=torch.bfloat16))
    assert not g.supported(x, weight[:, 1:])  # a strided view: not contiguous


@gpu
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)])
@pytest.mark.parametrize("tokens", [1, 2, 8])
def test_gemv_on_the_gpu(tokens, n, k):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    x, weight = _operands(tokens, n, k, "cuda")
    got = g.gemv(x, weight)
    want = _fp32(x, weight)
    assert torch.allclose(got.float(), want, rtol=2 ** -7, atol=2e-3), (got.float() - want).abs().max()


def test_the_model_sends_small_gpu_steps_to_it_as_switched(monkeypatch):
    from minivllm.model import layers

    assert g.ENGINE_MAX_TOKENS == 2 and g.PROLOGUE_MAX_TOKENS == 1  # where each measured faster (H100)
    assert g.ENGINE_SILU_PROLOGUE  # the SiLU·mul fold (gemv_add_norm measured slower in the engine: not wired in)
    monkeypatch.setattr(g, "ENGINE_MAX_TOKENS", 4)
    assert layers._gemv_tokens() == 4  # read at call time: a benchmark switches it before capturing graphs
    x, weight = _operands(2, 8, 64)
    assert torch.equal(layers.linear(x, weight), torch.nn.functional.linear(x, weight))  # a CPU: always F.linear
    gate_up = torch.randn(2, 128).to(torch.bfloat16)  # and the SiLU·mul fold: the two steps on a CPU
    assert torch.equal(layers.silu_and_mul_linear(gate_up, weight), layers.linear(layers.silu_and_mul(gate_up), weight))


@gpu
def test_the_model_with_it_matches_the_model_without(monkeypatch):
    """One decode-sized forward pass of a random bf16 model, cuBLAS against kernels.gemv in every linear layer."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from bench.models import TINY
    from minivllm.model.qwen3 import Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(TINY, device="cuda", dtype=torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    ids, positions = torch.tensor([5, 9], device="cuda"), torch.tensor([0, 1], device="cuda")
    with torch.inference_mode():
        monkeypatch.setattr(g, "ENGINE_MAX_TOKENS", 0)  # cuBLAS
        want = model.compute_logits(model(ids, positions)).float()
        monkeypatch.setattr(g, "ENGINE_MAX_TOKENS", 8)
        monkeypatch.setattr(g, "ENGINE_SILU_PROLOGUE", False)
        got = model.compute_logits(model(ids, positions)).float()
        monkeypatch.setattr(g, "ENGINE_SILU_PROLOGUE", True)  # SiLU·mul folded into down_proj too
        monkeypatch.setattr(g, "PROLOGUE_MAX_TOKENS", 2)  # (the engine: batch 1 only, where it is faster)
        calls, silu = [], g.gemv_silu
        monkeypatch.setattr(g, "gemv_silu", lambda *a, **k: calls.append(1) or silu(*a, **k))
        folded = model.compute_logits(model(ids, positions)).float()
    assert len(calls) == TINY.num_hidden_layers  # every layer's MLP took the fold
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(folded, want, atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- the prologue kernels
def _silu_operands(tokens: int, n: int, k: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(tokens, 2 * k, generator=gen) * 2).to(torch.bfloat16).to(device)
    weight = (torch.randn(n, k, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    return gate_up, weight


def _norm_operands(tokens: int, n: int, k: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(2)
    x, residual = (torch.randn(tokens, k, generator=gen).to(torch.bfloat16).to(device) for _ in range(2))
    residual[0] *= 30  # tokens of different scales: one rms per token, not one for all
    norm_weight = (1 + 0.3 * torch.randn(k, generator=gen)).to(torch.bfloat16).to(device)
    weight = (torch.randn(n, k, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    return x, residual, norm_weight, weight


@needs_sim
@pytest.mark.parametrize("tokens, n, k", [(1, 5, 64), (2, 3, 512), (3, 2, 72 * 8)])
def test_gemv_silu_matches_silu_and_mul_then_linear(tokens, n, k):
    gate_up, weight = _silu_operands(tokens, n, k)
    got = g.gemv_silu(gate_up, weight)
    want = g.gemv_silu_ref(gate_up, weight)  # SiLU·mul rounded to bf16, then the product in fp32
    assert got.shape == (tokens, n) and not torch.equal(got, torch.zeros_like(got))
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -8, atol=1e-3)
    plain = g.gemv_ref(gate_up[:, :k].contiguous(), weight)  # forgetting the SiLU·mul would be far off
    assert (plain.float() - want.float()).abs().max() > 0.1


@needs_sim
@pytest.mark.parametrize("tokens, n, k", [(1, 5, 64), (2, 3, 512), (3, 2, 72 * 8)])
def test_gemv_add_norm_matches_fused_add_rms_norm_then_linear(tokens, n, k):
    x, residual, norm_weight, weight = _norm_operands(tokens, n, k)
    before = x.clone(), residual.clone()
    got, new_residual = g.gemv_add_norm(x, residual, norm_weight, 1e-6, weight)
    want, want_residual = g.gemv_add_norm_ref(x, residual, norm_weight, 1e-6, weight)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -8, atol=1e-3)
    assert torch.equal(new_residual, want_residual)  # one rounding of an exact fp32 sum: bit for bit
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])  # out of place


def test_the_prologue_kernels_refuse_what_they_do_not_take():
    gate_up, weight = _silu_operands(1, 4, 64)
    with pytest.raises(ValueError, match="gemv_silu takes"):
        g.gemv_silu(gate_up[:, :96], weight)  # K = 48 is not weight's 64
    with pytest.raises(ValueError, match="gemv_silu takes"):
        g.gemv_silu(torch.zeros(9, 128, dtype=torch.bfloat16), weight)  # 9 tokens
    x, residual, norm_weight, weight = _norm_operands(2, 4, 64)
    with pytest.raises(ValueError, match="gemv_add_norm takes"):
        g.gemv_add_norm(x, residual[:1], norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="gemv_add_norm takes"):
        g.gemv_add_norm(x, residual, norm_weight[:32], 1e-6, weight)
    big = torch.zeros(8, 4096, dtype=torch.bfloat16)  # 64 KB of prepared x: more than a block's shared memory
    assert g.supported(big, torch.zeros(4, 4096, dtype=torch.bfloat16))
    assert not g.prologue_supported(big, torch.zeros(4, 4096, dtype=torch.bfloat16))


@needs_sim
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("n, k", [(5, 64), (9, 72 * 8)])
def test_the_per_warp_add_norm_kernel_matches_fused_add_rms_norm_then_linear(rows, n, k):
    x, residual, norm_weight, weight = _norm_operands(1, n, k)
    before = x.clone(), residual.clone()
    got, new_residual = g.gemv_add_norm(x, residual, norm_weight, 1e-6, weight, rows_per_warp=rows)
    want, want_residual = g.gemv_add_norm_ref(x, residual, norm_weight, 1e-6, weight)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -8, atol=1e-3)  # every row, the last included
    assert torch.equal(new_residual, want_residual)  # one rounding of an exact fp32 sum: bit for bit
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1])  # out of place
    plain = g.gemv_ref(x + residual, weight)  # forgetting the norm (the residual is 30x x) would be far off
    assert (plain.float() - want.float()).abs().max() > 0.1


def test_the_per_warp_add_norm_kernel_takes_one_token_and_compiled_row_counts():
    x, residual, norm_weight, weight = _norm_operands(2, 4, 64)
    with pytest.raises(ValueError, match="one token and 1, 2 or 4 rows"):
        g.gemv_add_norm(x, residual, norm_weight, 1e-6, weight, rows_per_warp=2)
    with pytest.raises(ValueError, match="one token and 1, 2 or 4 rows"):
        g.gemv_add_norm(x[:1], residual[:1], norm_weight, 1e-6, weight, rows_per_warp=3)


@gpu
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_the_prologue_kernels_on_the_gpu(tokens):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    gate_up, weight = _silu_operands(tokens, 1024, 3072, "cuda")
    torch.testing.assert_close(g.gemv_silu(gate_up, weight).float(), g.gemv_silu_ref(gate_up, weight).float(),
                               rtol=2 ** -7, atol=2e-3)
    for n in (4096, 6144):
        x, residual, norm_weight, weight = _norm_operands(tokens, n, 1024, "cuda")
        want, want_residual = g.gemv_add_norm_ref(x, residual, norm_weight, 1e-6, weight)
        for rows in (None, 1, 2, 4) if tokens == 1 else (None,):  # the block-wide kernel, the per-warp ones
            got, new_residual = g.gemv_add_norm(x, residual, norm_weight, 1e-6, weight, rows_per_warp=rows)
            assert torch.equal(new_residual, want_residual)
            # the rms's fp32 sum runs in another order than torch's: a normalized value may round to the next bf16
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2e-2)


def test_bench_gemv_is_registered_and_refuses_to_time_without_a_gpu():
    from bench import gemv as bench_gemv
    from bench import run

    assert run.BENCHMARKS["gemv"] == ("bench.gemv", "17_gemv_cuda") and callable(bench_gemv.run)
    if not torch.cuda.is_available():
        assert bench_gemv.main([]) == 2  # the simulator's timings would mean nothing


def test_l2_prefetch_takes_three_whole_tensors_and_is_a_no_op_off_a_captured_gpu_step():
    from minivllm.model import layers

    a, b, c = (torch.randn(n, 64).to(torch.bfloat16) for n in (3, 5, 7))
    g.l2_prefetch(a, b, c)  # a CPU tensor: nothing to warm, nothing changed
    with pytest.raises(ValueError, match="three contiguous"):
        g.l2_prefetch(a, b[:, :3], c)
    assert layers.l2_prefetch_fork(a[:1], lambda: (a, b, c)) is None  # not a GPU step being captured
    layers.l2_prefetch_join(None)


@needs_sim
def test_l2_prefetch_kernel_runs_in_the_simulator():
    arrays = [torch.randn(n, 64).to(torch.bfloat16).reshape(-1).view(torch.complex128).numpy() for n in (3, 5, 7)]
    before = [x.copy() for x in arrays]
    g.l2_prefetch_kernel[2, 32](*arrays)  # each thread's loops over lines: the indexing runs, no value changes
    assert all((x == y).all() for x, y in zip(arrays, before))


@gpu
def test_l2_prefetch_branches_off_a_captured_batch_1_step_and_changes_nothing(monkeypatch):
    from kernels._timing import capture_graph
    from minivllm.model import layers

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    monkeypatch.setattr(g, "ENGINE_L2_PREFETCH", True)
    ws = tuple((torch.randn(n, 1024, device="cuda") * 0.05).to(torch.bfloat16) for n in (1024, 6144, 3072))
    before = [w.clone() for w in ws]
    x = torch.randn(1, 1024, device="cuda").to(torch.bfloat16)
    out = torch.zeros(1, 6144, device="cuda", dtype=torch.bfloat16)
    sides = []

    def step():
        side = layers.l2_prefetch_fork(x, lambda: ws)
        sides.append(side)
        out.copy_(g.gemv(x, ws[1]))
        layers.l2_prefetch_join(side)

    graph = capture_graph(step)
    assert sides[-1] is not None and all(s is None for s in sides[:-1])  # only the capture forks
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, g.gemv(x, ws[1])) and all(torch.equal(w, v) for w, v in zip(ws, before))


@gpu
def test_an_engine_with_the_l2_prefetch_gives_the_same_tokens(monkeypatch):
    from bench.models import QWEN3_06B
    from minivllm import LLM, SamplingParams

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    answers = []
    for on in (False, True):
        monkeypatch.setattr(g, "ENGINE_L2_PREFETCH", on)  # before the graphs are captured
        llm = LLM(QWEN3_06B, device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=4,
                  num_kv_blocks=64, seed=0)  # a fixed pool: the first engine's memory need not be back yet
        answers.append([o.outputs[0].token_ids for o in llm.generate([[1, 2, 3, 4]], params, use_tqdm=False)])
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert answers[0] == answers[1]
