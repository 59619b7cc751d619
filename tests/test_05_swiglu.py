"""Phase 05: silu_and_mul (the activation of SwiGLU) and Qwen3's MLP, against answer keys written with
independent torch ops (float64 ``g * sigmoid(g) * u``; ``transformers``' Qwen3MLP). The numba kernels run
in the simulator on CPU (tiny shapes), and on Qwen3-0.6B's shapes when there is a GPU."""

import pytest
import torch

from kernels import activation as act
from kernels._env import simulator_enabled

needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the kernels in numba's CUDA simulator")
gpu = pytest.mark.gpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# one unit in the last place of each dtype, relative; the GPU kernels use fast exp and division (fastmath)
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def answer_key(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float64, rounded once to the input's dtype."""
    inter = gate_up.shape[-1] // 2
    g, u = gate_up[..., :inter].double(), gate_up[..., inter:].double()
    return (g * torch.sigmoid(g) * u).to(gate_up.dtype)


def assert_matches(got: torch.Tensor, gate_up: torch.Tensor) -> None:
    want = answer_key(gate_up)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=RTOL[got.dtype], atol=1e-6)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gate_up(*shape: int, dtype: torch.dtype = torch.float32, device: str | None = None) -> torch.Tensor:
    return (3 * torch.randn(*shape, device=device or _device())).to(dtype)  # |g| up to ~12: both tails of silu


# ----------------------------------------------------------------------------- reference and MLP
def test_reference_matches_the_answer_key_and_is_silu_times_up():
    gate_up = _gate_up(4, 2 * 24, device="cpu")
    assert_matches(act.silu_and_mul_ref(gate_up), gate_up)
    # a worked example: silu(0) = 0, silu(2) = 2 / (1 + e^-2) = 1.7616
    got = act.silu_and_mul_ref(torch.tensor([[0.0, 2.0, 5.0, 3.0]]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 3 * 2 / (1 + torch.e ** -2)]]))


def test_mlp_ref_is_qwen3s_mlp_with_gate_and_up_fused():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    torch.manual_seed(0)
    mlp = Qwen3MLP(transformers.Qwen3Config(hidden_size=32, intermediate_size=48, hidden_act="silu"))
    x = torch.randn(5, 32)
    w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # (2 * inter, hidden)
    with torch.no_grad():
        torch.testing.assert_close(act.mlp_ref(x, w_gate_up, mlp.down_proj.weight), mlp(x))
        kernel = lambda gu: act.silu_and_mul(gu, backend="numba" if simulator_enabled() else "auto")  # noqa: E731
        torch.testing.assert_close(act.mlp_ref(x, w_gate_up, mlp.down_proj.weight, act=kernel), mlp(x))


# ----------------------------------------------------------------------------- kernels in the simulator
@needs_sim
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar", "16B"])
@pytest.mark.parametrize("shape", [(1, 16), (3, 80), (5, 48)])
def test_kernels_match_the_answer_key(dtype, vectorized, shape):
    # (1, 16): one token, one word per half row in bf16; (3, 80), (5, 48): 120 outputs, fewer than the
    # 4 blocks x 32 simulated threads, so the last block has idle threads. inter 8, 40, 24: whole 16-byte words.
    gate_up = _gate_up(*shape, dtype=dtype)
    assert_matches(act.silu_and_mul(gate_up, vectorized=vectorized, backend="numba"), gate_up)


@needs_sim
def test_grid_stride_loop_covers_more_outputs_than_the_simulated_grid():
    gate_up = _gate_up(7, 2 * 40)  # 280 outputs > 4 blocks x 32 threads; 70 fp32 words
    for vectorized in (False, True):
        assert_matches(act.silu_and_mul(gate_up, vectorized=vectorized, backend="numba"), gate_up)


@needs_sim
def test_leading_dimensions_and_out_are_respected():
    gate_up = _gate_up(2, 3, 2 * 8, dtype=torch.bfloat16)
    out = torch.full((2, 3, 8), 7.0, dtype=torch.bfloat16)
    got = act.silu_and_mul(gate_up, out=out, backend="numba")
    assert got is out
    assert_matches(out, gate_up)


@needs_sim
def test_launcher_picks_the_scalar_kernel_when_16_byte_words_do_not_fit(monkeypatch):
    launched = []
    monkeypatch.setattr(act, "launch", lambda kernel, *a, **k: launched.append(kernel))
    act.silu_and_mul(_gate_up(2, 2 * 16, dtype=torch.bfloat16), backend="numba")
    act.silu_and_mul(_gate_up(2, 2 * 12, dtype=torch.bfloat16), backend="numba")  # 12 % 8 != 0
    act.silu_and_mul(_gate_up(2, 2 * 12, dtype=torch.float32), backend="numba")  # 12 % 4 == 0
    unaligned = _gate_up(2 * 32 + 1, dtype=torch.bfloat16)[1:].view(2, 32)  # starts 2 bytes into a word
    act.silu_and_mul(unaligned, backend="numba")
    act.silu_and_mul(_gate_up(2, 2 * 16, dtype=torch.bfloat16), vectorized=False, backend="numba")
    assert launched == [act.silu_and_mul_bf16_kernel, act.silu_and_mul_kernel, act.silu_and_mul_f32_kernel,
                        act.silu_and_mul_kernel, act.silu_and_mul_kernel]
    with pytest.raises(ValueError, match="vectorized=True needs inter % 8 == 0"):
        act.silu_and_mul(unaligned, vectorized=True, backend="numba")


@needs_sim
def test_unaligned_input_still_gives_the_right_answer():
    unaligned = _gate_up(3 * 32 + 1, dtype=torch.bfloat16)[1:].view(3, 32)
    assert_matches(act.silu_and_mul(unaligned, backend="numba"), unaligned)


# ----------------------------------------------------------------------------- launcher
def test_no_tokens_give_an_empty_result():
    got = act.silu_and_mul(torch.empty(0, 2 * 16))
    assert got.shape == (0, 16)


def test_torch_backend_runs_the_reference():
    gate_up = _gate_up(3, 2 * 10, device="cpu")
    torch.testing.assert_close(act.silu_and_mul(gate_up, backend="torch"), act.silu_and_mul_ref(gate_up))


def test_bad_arguments_raise_errors_that_name_them():
    with pytest.raises(ValueError, match="gate_up's last dimension must be even.*got shape \\(2, 7\\)"):
        act.silu_and_mul(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="gate_up's last dimension must be even"):
        act.silu_and_mul(torch.tensor(1.0))
    with pytest.raises(TypeError, match="gate_up must have dtype"):
        act.silu_and_mul(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="gate_up must be a torch.Tensor"):
        act.silu_and_mul([[1.0, 2.0]])
    with pytest.raises(ValueError, match="gate_up must be contiguous"):
        act.silu_and_mul(torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4\)"):
        act.silu_and_mul(torch.zeros(2, 8), out=torch.zeros(2, 8))
    with pytest.raises(TypeError, match="out must have dtype in \\(float32\\)"):
        act.silu_and_mul(torch.zeros(2, 8), out=torch.zeros(2, 4, dtype=torch.half))
    with pytest.raises(ValueError, match="backend must be one of"):
        act.silu_and_mul(torch.zeros(2, 8), backend="cuda")


# ----------------------------------------------------------------------------- GPU only
@gpu
@pytest.mark.parametrize("tokens", [1, 7, 4097, 16384])
@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar", "16B"])
def test_gpu_qwen3_shapes_in_bf16(tokens, vectorized):
    gate_up = _gate_up(tokens, 2 * 3072, dtype=torch.bfloat16)
    got = act.silu_and_mul(gate_up, vectorized=vectorized)
    assert_matches(got, gate_up)
    assert (got == act.silu_and_mul_ref(gate_up)).float().mean() > 0.999  # fast math: a rare 1-ulp flip


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4097, 2 * 3072), (333, 200), (7, 3, 2000), (5, 10), (70000, 16)])
def test_gpu_every_dtype_and_awkward_shapes(dtype, shape):
    gate_up = _gate_up(*shape, dtype=dtype)
    for vectorized in (None, False):
        assert_matches(act.silu_and_mul(gate_up, vectorized=vectorized), gate_up)


@gpu
def test_gpu_kernel_is_captured_by_a_cuda_graph_with_a_static_out():
    from kernels._timing import capture_graph

    gate_up = _gate_up(8, 2 * 3072, dtype=torch.bfloat16)
    out = torch.empty(8, 3072, device="cuda", dtype=torch.bfloat16)
    graph = capture_graph(lambda: act.silu_and_mul(gate_up, out=out))
    gate_up.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, gate_up)
