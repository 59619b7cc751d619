"""Phase 04: rotary position embedding (kernels.rope), against answer keys written independently of it:
the pairs (x[i], x[i + d/2]) as complex numbers multiplied by e^(i * angle) in float64, and
``transformers``' own rotary embedding. Kernels run in the simulator on CPU and on a GPU when there is one."""

import pytest
import torch

from kernels import rope
from kernels._env import simulator_enabled
from kernels._launch import launch

needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the kernels in numba's CUDA simulator")
gpu = pytest.mark.gpu
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),  # fp32: a few roundings; else one rounding to the dtype
       torch.float16: dict(rtol=2**-10, atol=1e-3), torch.bfloat16: dict(rtol=2**-7, atol=1e-2)}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def key_angles(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Answer key: angle[t, i] = positions[t] * theta^(-2i / head_dim), float64."""
    i = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    return positions.double()[:, None] * theta ** (-2 * i / head_dim)


def key_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Answer key: z = x[i] + j x[i + d/2] times (cos + j sin), in float64.

    x: (tokens, heads, d); cos, sin: (tokens, d/2).
    """
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.complex(cos.double(), sin.double())[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def key_from_table(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_sin[positions.long()].chunk(2, dim=-1)
    return key_rotate(x, cos, sin)


def _qk(tokens: int, q_heads: int, kv_heads: int, d: int, dtype: torch.dtype, device: str | None = None):
    device = device or _device()
    return (torch.randn(tokens, q_heads, d, device=device).to(dtype),
            torch.randn(tokens, kv_heads, d, device=device).to(dtype))


def _assert_rotated(got: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    want = key_from_table(x, positions, cos_sin)
    torch.testing.assert_close(got.double(), want.to(x.dtype).double(), **TOL[x.dtype])


# ----------------------------------------------------------------------------- the table
def test_rope_cache_holds_cos_then_sin_of_position_times_inv_freq():
    table = rope.rope_cache(16, 100, 10_000.0)
    assert table.shape == (100, 16) and table.dtype == torch.float32
    angles = key_angles(16, torch.arange(100), 10_000.0)
    torch.testing.assert_close(table.double(), torch.cat((angles.cos(), angles.sin()), dim=-1), rtol=0, atol=2e-5)
    assert torch.equal(table[0], torch.cat((torch.ones(8), torch.zeros(8))))  # position 0: no rotation
    assert rope.rope_cache(16, 4, 1e4, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_rope_cache_refuses_odd_or_empty_shapes():
    with pytest.raises(ValueError, match="head_dim must be a positive even number"):
        rope.rope_cache(7, 10, 1e4)
    with pytest.raises(ValueError, match="max_position must be positive"):
        rope.rope_cache(8, 0, 1e4)


def test_reference_and_table_match_transformers_llama_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    d, theta = 32, 1e6
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=2, head_dim=d,
                         rope_theta=theta, max_position_embeddings=512)
    positions = torch.tensor([5, 0, 511, 17, 17, 300])  # a batch of several sequences, any order
    q, k = _qk(len(positions), 4, 2, d, torch.float32, "cpu")
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])  # (1, tokens, d): cos(angle) twice over
    table = rope.rope_cache(d, 512, theta)
    torch.testing.assert_close(table[positions], torch.cat((cos[0, :, : d // 2], sin[0, :, : d // 2]), -1),
                               rtol=0, atol=1e-6)
    want_q, want_k = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)  # (1, tokens, heads, d)
    got_q, got_k = rope.apply_rope_ref(q, k, positions, table)
    torch.testing.assert_close(got_q, want_q[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_the_complex_key(dtype):
    table = rope.rope_cache(64, 1000, 1e4)
    positions = torch.randint(0, 1000, (9,))
    q, k = _qk(9, 3, 1, 64, dtype, "cpu")
    q_out, k_out = rope.apply_rope_ref(q, k, positions, table)
    assert q_out.dtype == dtype and not q_out.data_ptr() == q.data_ptr()  # out of place
    _assert_rotated(q_out, q, positions, table)
    _assert_rotated(k_out, k, positions, table)


def test_scores_depend_only_on_relative_position():
    """RoPE's point: q at position m and k at position n score q·k as a function of m - n alone."""
    table = rope.rope_cache(32, 200, 1e4)
    q, k = _qk(1, 1, 1, 32, torch.float32, "cpu")
    scores = []
    for shift in (0, 7, 150):
        m, n = torch.tensor([10 + shift]), torch.tensor([3 + shift])
        rq, _ = rope.apply_rope_ref(q, k, m, table)
        _, rk = rope.apply_rope_ref(q, k, n, table)
        scores.append(float((rq * rk).sum()))
    assert scores[0] == pytest.approx(scores[1], abs=1e-4) and scores[0] == pytest.approx(scores[2], abs=1e-4)


# ----------------------------------------------------------------------------- kernels (simulator / GPU)
SHAPES = [(1, 2, 1, 16), (5, 3, 1, 32), (3, 9, 2, 16)]  # (tokens, q_heads, kv_heads, d); 9 + 2 heads: uneven slices


@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar", "16B"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_rotate_in_place_like_the_key(shape, dtype, vectorized):
    tokens, q_heads, kv_heads, d = shape
    table = rope.rope_cache(d, 64, 1e4, device=_device())
    positions = torch.randint(0, 64, (tokens,), device=_device(), dtype=torch.int32 if tokens % 2 else torch.int64)
    q, k = _qk(tokens, q_heads, kv_heads, d, dtype)
    q0, k0 = q.clone(), k.clone()
    got_q, got_k = rope.apply_rope(q, k, positions, table, vectorized=vectorized, backend="numba")
    assert got_q is q and got_k is k  # in place
    _assert_rotated(q, q0, positions, table)
    _assert_rotated(k, k0, positions, table)


def test_scalar_and_16_byte_kernels_agree_with_the_reference_bit_for_bit_in_the_simulator():
    if not simulator_enabled():
        pytest.skip("on a GPU the compiler fuses multiply-adds; the simulator rounds like torch")
    table = rope.rope_cache(32, 64, 1e4)
    positions = torch.tensor([0, 63, 7])
    q, k = _qk(3, 2, 2, 32, torch.bfloat16)
    want = rope.apply_rope_ref(q, k, positions, table)
    for vectorized in (False, True):
        got = rope.apply_rope(q.clone(), k.clone(), positions, table, vectorized=vectorized)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_launcher_takes_16_bytes_only_when_the_tensors_allow_it():
    table = rope.rope_cache(32, 8, 1e4)
    q, k = _qk(2, 2, 1, 32, torch.bfloat16, "cpu")
    assert rope.can_vectorize(q, k, table)
    q6, k6 = _qk(2, 2, 1, 8, torch.bfloat16, "cpu")  # half a head = 4 values: less than one 16-byte word
    assert not rope.can_vectorize(q6, k6, rope.rope_cache(8, 8, 1e4))
    assert rope.can_vectorize(*_qk(2, 2, 1, 8, torch.float32, "cpu"), rope.rope_cache(8, 8, 1e4))  # 4 fp32 = 16 B
    shifted = torch.randn(2 * 2 * 32 + 1).to(torch.bfloat16)[1:].view(2, 2, 32)  # starts 2 bytes past alignment
    assert not rope.can_vectorize(shifted, k, table)
    with pytest.raises(ValueError, match="vectorized=True needs"):
        rope.apply_rope(shifted, k, torch.tensor([1, 2]), table, vectorized=True)


@needs_sim
def test_unaligned_and_narrow_heads_fall_back_to_the_scalar_kernel():
    table = rope.rope_cache(32, 8, 1e4)
    q = torch.randn(2 * 2 * 32 + 1).to(torch.bfloat16)[1:].view(2, 2, 32)
    k = torch.randn(2, 1, 32).to(torch.bfloat16)
    positions = torch.tensor([3, 1])
    q0, k0 = q.clone(), k.clone()
    rope.apply_rope(q, k, positions, table)
    _assert_rotated(q, q0, positions, table)
    q, k = _qk(2, 1, 1, 6, torch.float16)  # head_dim 6: the scalar kernel takes any even size
    q0, k0 = q.clone(), k.clone()
    rope.apply_rope(q, k, positions, rope.rope_cache(6, 8, 1e4))
    _assert_rotated(k, k0, positions, rope.rope_cache(6, 8, 1e4))


def test_zero_tokens_is_a_no_op():
    q, k = _qk(0, 2, 1, 16, torch.float32)
    positions = torch.zeros(0, dtype=torch.long, device=q.device)
    assert rope.apply_rope(q, k, positions, rope.rope_cache(16, 4, 1e4, device=q.device))[0] is q


def test_the_torch_backend_is_in_place_too():
    table = rope.rope_cache(16, 32, 1e4)
    positions = torch.tensor([4, 9])
    q, k = _qk(2, 2, 1, 16, torch.bfloat16, "cpu")
    q0 = q.clone()
    got_q, _ = rope.apply_rope(q, k, positions, table, backend="torch")
    assert got_q is q
    _assert_rotated(q, q0, positions, table)


# ----------------------------------------------------------------------------- positions outside the table
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_positions_outside_the_table_raise_on_cpu(backend):
    table = rope.rope_cache(16, 10, 1e4)
    q, k = _qk(3, 1, 1, 16, torch.float32, "cpu")
    for bad in ([0, 10, 2], [0, -1, 2]):
        with pytest.raises(ValueError, match=r"positions must be in \[0, 10\)"):
            rope.apply_rope(q, k, torch.tensor(bad), table, backend=backend)
    with pytest.raises(ValueError, match="positions must be in"):
        rope.apply_rope_ref(q, k, torch.tensor([0, 1, 99]), table)


@needs_sim
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_kernels_poison_tokens_outside_the_table_with_nan(dtype):
    """What a GPU call does without a host check: NaN in that token's q and k, never an out-of-bounds read."""
    table = rope.rope_cache(16, 10, 1e4)
    positions = torch.tensor([1, 10, -3, 9])
    q, k = _qk(4, 2, 1, 16, dtype)
    vq, vk = q.clone(), k.clone()
    launch(rope.rope_kernel, 2, 32, q, k, positions, table, backend="simulator")
    chunks = 8 // rope.VECTOR_WIDTH[dtype]
    words = [t.view(torch.complex128).view(-1) for t in (vq, vk, table)]
    launch(rope.VECTOR_KERNELS[dtype], 1, 32, words[0], words[1], positions, words[2], 2, 1, chunks, 2,
           backend="simulator")
    for x in (q, k, vq, vk):
        assert x[[1, 2]].isnan().all() and not x[[0, 3]].isnan().any()


# ----------------------------------------------------------------------------- argument checks
def _bad_calls():
    q, k = torch.zeros(3, 4, 16), torch.zeros(3, 2, 16)
    pos, table = torch.zeros(3, dtype=torch.long), rope.rope_cache(16, 8, 1e4)
    return {
        "q dtype": ((q.long(), k, pos, table), TypeError, "q must have dtype"),
        "q 2-D": ((q[0], k, pos, table), ValueError, "q must have 3 dimensions"),
        "k dtype": ((q, k.half(), pos, table), TypeError, "k must have dtype in \\(float32\\)"),
        "k tokens": ((q, k[:2], pos, table), ValueError, "k must have shape \\(3, \\*, 16\\)"),
        "k head_dim": ((q, torch.zeros(3, 2, 8), pos, table), ValueError, "k must have shape"),
        "k strided": ((q, torch.zeros(3, 16, 2).transpose(1, 2), pos, table), ValueError, "k must be contiguous"),
        "positions float": ((q, k, pos.float(), table), TypeError, "positions must have dtype in \\(int32, int64\\)"),
        "positions count": ((q, k, pos[:2], table), ValueError, "positions must have shape \\(3\\)"),
        "table dtype": ((q, k, pos, table.half()), TypeError, "cos_sin must have dtype in \\(float32\\)"),
        "table width": ((q, k, pos, rope.rope_cache(8, 8, 1e4)), ValueError, "cos_sin must have shape \\(\\*, 16\\)"),
        "odd head_dim": ((torch.zeros(3, 4, 5), torch.zeros(3, 2, 5), pos, torch.zeros(8, 5)), ValueError,
                         "even head_dim"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_naming_the_argument(case):
    args, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        rope.apply_rope(*args)


def test_unknown_backend_is_refused():
    q, k = _qk(1, 1, 1, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        rope.apply_rope(q, k, torch.zeros(1, dtype=torch.long), rope.rope_cache(16, 2, 1e4), backend="triton")


# ----------------------------------------------------------------------------- GPU only
QWEN3 = (16, 8, 128, 1e6, 40960)  # q heads, kv heads, head_dim, theta, max positions (Qwen3-0.6B)


@gpu
@pytest.mark.parametrize("tokens", [1, 4097, 16384])
@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar", "16B"])
def test_gpu_qwen3_shapes_bf16(tokens, vectorized):
    q_heads, kv_heads, d, theta, max_position = QWEN3
    table = rope.rope_cache(d, max_position, theta, device="cuda")
    pos_dtype = torch.int32 if tokens % 2 else torch.int64
    positions = torch.randint(0, max_position, (tokens,), device="cuda", dtype=pos_dtype)
    q, k = _qk(tokens, q_heads, kv_heads, d, torch.bfloat16)
    q0, k0 = q.clone(), k.clone()
    rope.apply_rope(q, k, positions, table, vectorized=vectorized)
    _assert_rotated(q, q0, positions, table)
    _assert_rotated(k, k0, positions, table)
    eager = rope.apply_rope_ref(q0, k0, positions, table)  # and within one bf16 rounding of the eager reference
    torch.testing.assert_close(q, eager[0], rtol=2**-7, atol=1e-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("shape", [(3000, 16, 8, 128), (333, 9, 3, 64)], ids=["qwen3", "smollm2"])
def test_gpu_other_dtypes_and_head_dims(dtype, shape):
    tokens, q_heads, kv_heads, d = shape
    table = rope.rope_cache(d, 8192, 1e5, device="cuda")
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    for vectorized in (False, True):
        q, k = _qk(tokens, q_heads, kv_heads, d, dtype)
        q0, k0 = q.clone(), k.clone()
        rope.apply_rope(q, k, positions, table, vectorized=vectorized)
        _assert_rotated(q, q0, positions, table)
        _assert_rotated(k, k0, positions, table)


@gpu
@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar", "16B"])
def test_gpu_positions_outside_the_table_become_nan(vectorized):
    table = rope.rope_cache(128, 100, 1e6, device="cuda")
    q, k = _qk(4, 16, 8, 128, torch.bfloat16)
    rope.apply_rope(q, k, torch.tensor([0, 100, -1, 99], device="cuda"), table, vectorized=vectorized)
    for x in (q, k):
        assert x[[1, 2]].isnan().all() and not x[[0, 3]].isnan().any()


@gpu
def test_gpu_rope_is_captured_by_a_cuda_graph():
    from kernels._timing import capture_graph

    table = rope.rope_cache(128, 4096, 1e6, device="cuda")
    q, k = _qk(8, 16, 8, 128, torch.bfloat16)
    positions = torch.arange(8, device="cuda")
    graph = capture_graph(lambda: rope.apply_rope(q, k, positions, table))  # static buffers, in place
    q0, k0 = _qk(8, 16, 8, 128, torch.bfloat16)
    q.copy_(q0)
    k.copy_(k0)
    positions.copy_(torch.arange(100, 108, device="cuda"))  # a decode step further on
    graph.replay()
    torch.cuda.synchronize()
    _assert_rotated(q, q0, positions, table)
    _assert_rotated(k, k0, positions, table)
