"""kernels.gemv: small-batch matrix-vector products against ``F.linear`` in fp32 -- in numba's CUDA simulator on
a CPU (tiny shapes), and on a GPU at Qwen3-0.6B's shapes when there is one."""

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

    assert g.ENGINE_MAX_TOKENS == 8  # measured faster than cuBLAS in the engine's batch-1 decode (H200)
    monkeypatch.setattr(g, "ENGINE_MAX_TOKENS", 4)
    assert layers._gemv_tokens() == 4  # read at call time: a benchmark switches it before capturing graphs
    x, weight = _operands(2, 8, 64)
    assert torch.equal(layers.linear(x, weight), torch.nn.functional.linear(x, weight))  # a CPU: always F.linear


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
        got = model.compute_logits(model(ids, positions)).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
