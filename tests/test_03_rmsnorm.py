"""Phase 03: RMSNorm and fused residual-add + RMSNorm (kernels.rmsnorm), against an independent
answer key: ``torch.nn.functional.rms_norm`` in fp32. On CPU the numba kernels run in the simulator
on tiny shapes; the ``gpu`` tests run Qwen3-0.6B shapes on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from kernels import _rmsnorm_vec, rmsnorm
from kernels._env import simulator_enabled
from kernels._launch import launch

needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the kernels in numba's CUDA simulator")
gpu = pytest.mark.gpu
EPS = 1e-6
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = list(TOL)


def key(x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The answer key: torch's own RMSNorm in fp32, rounded once to x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), w.float(), eps).to(x.dtype)


def key_fused(x, residual, w, eps=EPS):
    s = (x.float() + residual.float()).to(x.dtype)  # vLLM rounds the sum before normalizing it
    return key(s, w, eps), s


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, device=None):
    device = device or _device()
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    return x, torch.randn(shape, device=device, dtype=dtype), torch.rand(shape[-1], device=device, dtype=dtype) + 0.5


def _assert_close(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("dtype", DTYPES)
def test_references_match_the_answer_key(dtype):
    x, r, w = _inputs((4, 3, 48), dtype, "cpu")
    _assert_close(rmsnorm.rms_norm_ref(x, w, EPS), key(x, w), dtype)
    out, s = rmsnorm.fused_add_rms_norm_ref(x, r, w, EPS)
    want_out, want_s = key_fused(x, r, w)
    assert torch.equal(s, want_s)
    _assert_close(out, want_out, dtype)


def test_eps_matters_for_an_all_zero_row():
    x, w = torch.zeros(1, 8), torch.ones(8)
    assert torch.equal(rmsnorm.rms_norm_ref(x, w, EPS), torch.zeros(1, 8))  # 0 / sqrt(eps), not NaN


# ----------------------------------------------------------------------------- kernels, via the launchers
SHAPES = [(1, 64), (5, 40), (3, 2, 16), (2, 24)]  # 1 token; rows and widths that do not divide the block
ODD_SHAPES = [(2, 7), (3, 33)]  # not whole 16-byte chunks: only the scalar kernel fits


@needs_sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_the_answer_key(shape, vectorized, dtype):
    x, _, w = _inputs(shape, dtype)
    got = rmsnorm.rms_norm(x, w, EPS, vectorized=vectorized, backend="numba")
    assert got.shape == x.shape and got.dtype == dtype
    _assert_close(got, key(x, w), dtype)


@needs_sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_fused_add_rms_norm_updates_both_tensors_in_place(shape, vectorized, dtype):
    x, r, w = _inputs(shape, dtype)
    want_x, want_r = key_fused(x, r, w)
    got_x, got_r = rmsnorm.fused_add_rms_norm(x, r, w, EPS, vectorized=vectorized, backend="numba")
    assert got_x is x and got_r is r
    torch.testing.assert_close(r, want_r, atol=0, rtol=0)  # one rounding of an fp32 sum: exact
    _assert_close(x, want_x, dtype)


@needs_sim
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_widths_that_are_not_whole_chunks_take_the_scalar_kernel(shape):
    x, r, w = _inputs(shape, torch.bfloat16)
    assert not rmsnorm.can_vectorize(x, w)
    _assert_close(rmsnorm.rms_norm(x, w, EPS), key(x, w), torch.bfloat16)
    want_x, want_r = key_fused(x, r, w)
    rmsnorm.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(r, want_r)
    _assert_close(x, want_x, torch.bfloat16)


@needs_sim
def test_out_may_be_x_itself_and_is_returned():
    x, _, w = _inputs((3, 32), torch.float32)
    want = key(x, w)
    assert rmsnorm.rms_norm(x, w, EPS, out=x) is x
    _assert_close(x, want, torch.float32)


@needs_sim
def test_the_whole_block_reduction_and_full_registers_in_the_simulator():
    # The launcher keeps simulated groups small; launch the configurations a GPU uses directly.
    x, r, w = _inputs((3, 100), torch.float32, "cpu")
    out = torch.empty_like(x)  # 64 threads per row: two warps, the two-level reduction; 2 blocks for 3 rows
    launch(rmsnorm.rms_norm_kernel, 2, 64, x, out, w, EPS, 64, backend="simulator")
    _assert_close(out, key(x, w), torch.float32)
    x, r, w = _inputs((5, 64), torch.bfloat16, "cpu")  # 8 chunks per row: MAX_CHUNKS per thread
    want_x, want_r = key_fused(x, r, w)
    views = [t.view(torch.complex128) for t in (x, r, w)]
    group = 8 // _rmsnorm_vec.MAX_CHUNKS
    launch(_rmsnorm_vec.fused_add_rms_norm_bf16_kernel, 1, 32, *views, EPS, group, backend="simulator")
    assert torch.equal(r, want_r)
    _assert_close(x, want_x, torch.bfloat16)


@needs_sim
def test_the_block_per_row_kernels_give_the_warp_kernels_bits(width=128):
    """``row=True`` (bf16): a block per row, a 16-byte chunk per thread, one barrier. Its RMSNorm and fused add give
    the very bits of the warp-per-row kernels (the same roundings; only the sum's order differs) and match the key,
    and on a row of fewer chunks than a warp (128 bf16: 16 chunks, 16 idle threads). Seeded: the two sum the squares in
    another order, which on some inputs moves a last bit (see _within_one_bf16_step)."""
    torch.manual_seed(0)
    x, r, w = _inputs((3, width), torch.bfloat16, "cpu")
    got = rmsnorm.rms_norm(x, w, EPS, row=True, backend="numba")
    assert torch.equal(got, rmsnorm.rms_norm(x, w, EPS, row=False, backend="numba"))
    _assert_close(got, key(x, w), torch.bfloat16)
    fx, fr = rmsnorm.fused_add_rms_norm(x.clone(), r.clone(), w, EPS, row=True, backend="numba")
    gx, gr = rmsnorm.fused_add_rms_norm(x.clone(), r.clone(), w, EPS, row=False, backend="numba")
    want_x, want_r = key_fused(x, r, w)
    assert torch.equal(fx, gx) and torch.equal(fr, gr) and torch.equal(fr, want_r)
    _assert_close(fx, want_x, torch.bfloat16)


def _within_one_bf16_step(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal but for a last-bit difference: two fp32 sums of squares in another order can round 1/rms one ulp
    apart, and that can move a bf16 result across a rounding boundary."""
    return bool(((a.float() - b.float()).abs() <= b.float().abs() * 2**-7 + 1e-30).all())


@needs_sim
@pytest.mark.parametrize(("width", "per_thread"), [(1024, 4), (320, 2)])
def test_one_warp_a_row_gives_the_chunk_a_thread_kernels_values(width, per_thread):
    """The block of one warp holding several chunks a thread (chunks t, t + 32, ...; at 320 bf16 = 40 chunks, 8
    threads hold a second one; ``rmsnorm.ROW_WARP_ROWS``, bench.norm_variants' ``row_w1c4``) against the block of one
    chunk a thread: the same roundings, so the same bits but where the sum's order moves the last one; the new
    residual exactly; both within the key's tolerance."""
    torch.manual_seed(width)
    x, r, w = _inputs((3, width), torch.bfloat16, "cpu")
    one_warp = _rmsnorm_vec.row_kernels(torch.bfloat16, 1, per_thread, pdl=False)
    assert one_warp[0].row_block == 32 and _rmsnorm_vec.row_kernels(torch.bfloat16, 4)[0].row_block == 128
    got = torch.empty_like(x)
    rmsnorm._run(one_warp[0], x, got, w, EPS, True, "simulator", row=True)
    assert _within_one_bf16_step(got, rmsnorm.rms_norm(x, w, EPS, row=True, backend="numba"))
    _assert_close(got, key(x, w), torch.bfloat16)
    fx, fr = x.clone(), r.clone()
    rmsnorm._run(one_warp[1], fx, fr, w, EPS, True, "simulator", row=True)
    gx, gr = rmsnorm.fused_add_rms_norm(x.clone(), r.clone(), w, EPS, row=True, backend="numba")
    want_x, want_r = key_fused(x, r, w)
    assert _within_one_bf16_step(fx, gx) and torch.equal(fr, gr) and torch.equal(fr, want_r)
    _assert_close(fx, want_x, torch.bfloat16)


def test_rms_norm_of_many_rows_takes_one_warp_a_row_without_pdl_when_it_is_on(monkeypatch):
    assert rmsnorm.ROW_WARP_ROWS == (2048, 6144)  # where bench.norm_variants measured it faster (H100)
    monkeypatch.setattr(rmsnorm, "ROW_WARP_ROWS", None)  # off: a block of 4 warps at every row count
    assert rmsnorm._row_kernel(False, torch.empty(4096, 1024, dtype=torch.bfloat16), True, "gpu", None) \
        is _rmsnorm_vec.row_kernels(torch.bfloat16, 4)[0]
    monkeypatch.setattr(rmsnorm, "ROW_WARP_ROWS", (2048, 6144))
    lo, hi = rmsnorm.ROW_WARP_ROWS
    one_warp = _rmsnorm_vec.row_kernels(torch.bfloat16, 1, 4, pdl=False)
    assert not getattr(one_warp[0], "pdl", False) and _rmsnorm_vec.row_kernels(torch.bfloat16, 4)[0].pdl
    for rows in (lo, hi):
        assert rmsnorm._row_kernel(False, torch.empty(rows, 1024, dtype=torch.bfloat16), True, "gpu", None) \
            is one_warp[0]
    for rows in (lo - 1, hi + 1):  # outside the range: a block of 4 warps, with PDL
        assert rmsnorm._row_kernel(False, torch.empty(rows, 1024, dtype=torch.bfloat16), True, "gpu", None) \
            is _rmsnorm_vec.row_kernels(torch.bfloat16, 4)[0]
    many = torch.empty(lo, 1024, dtype=torch.bfloat16)  # the fused add + norm keeps 4 warps
    assert rmsnorm._row_kernel(True, many, True, "gpu", None) is _rmsnorm_vec.row_kernels(torch.bfloat16, 4)[1]
    heads = torch.empty(lo, 16, 128, dtype=torch.bfloat16)  # QK-norm's heads are not hidden-size rows: a head
    assert rmsnorm._row_kernel(False, heads, True, "gpu", None) is _rmsnorm_vec.head_kernel(4, 4, 64)  # kernel's
    narrow = torch.empty(lo, 128, dtype=torch.bfloat16)  # 16 chunks: not a hidden-size row either
    assert rmsnorm._row_kernel(False, narrow, True, "gpu", None) is _rmsnorm_vec.head_kernel(16, 1, 256)


def test_the_one_warp_range_is_the_gpus_own_where_one_was_measured(monkeypatch):
    """``rmsnorm.row_warp_rows``: an H200 gives RMSNorm of 2k rows and more the one-warp blocks (measured faster
    there at 8k and 16k), another GPU the H100's range; the CPU keeps ``ROW_WARP_ROWS``; None switches it off."""
    names = {0: "NVIDIA H200", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(rmsnorm, "_gpu_name", lambda index: names[index])
    h200, h100 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert rmsnorm.row_warp_rows(h200) == (2048, 2**31 - 1) and rmsnorm.row_warp_rows(h100) == (2048, 6144)
    assert rmsnorm.row_warp_rows(torch.device("cpu")) == rmsnorm.ROW_WARP_ROWS
    many = torch.empty(8192, 1024, dtype=torch.bfloat16)  # _row_kernel asks row_warp_rows for the tensor's device
    monkeypatch.setattr(rmsnorm, "row_warp_rows", lambda device: (2048, 2**31 - 1))
    assert rmsnorm._row_kernel(False, many, True, "gpu", None) \
        is _rmsnorm_vec.row_kernels(torch.bfloat16, 1, 4, pdl=False)[0]
    monkeypatch.setattr(rmsnorm, "row_warp_rows", lambda device: (2048, 6144))
    assert rmsnorm._row_kernel(False, many, True, "gpu", None) is _rmsnorm_vec.row_kernels(torch.bfloat16, 4)[0]
    monkeypatch.undo()
    monkeypatch.setattr(rmsnorm, "_gpu_name", lambda index: names[index])
    monkeypatch.setattr(rmsnorm, "ROW_WARP_ROWS", None)
    assert rmsnorm.row_warp_rows(h200) is None and rmsnorm.row_warp_rows(h100) is None


@needs_sim
@pytest.mark.parametrize("layout", [(16, 1, 256), (4, 4, 64), (8, 2, 128)])
def test_the_head_kernels_give_the_warp_kernels_values(layout):
    """QK-norm's head kernels (``make_head_kernel``: ``threads`` a 128-wide head, ``rows_per_thread`` heads a thread)
    against the answer key and the warp kernels: a last grid block only partly filled (heads past the end are read
    again from the last one and not written), and in place."""
    threads, per_thread, block = layout
    torch.manual_seed(threads)
    x, _, w = _inputs((3, 16, 128), torch.bfloat16, "cpu")  # 48 heads: 16 / 64 / 32 heads a block
    kernel = _rmsnorm_vec.head_kernel(*layout)
    assert kernel.row_block == block and kernel.rows_per_block == block // threads * per_thread
    got = torch.full_like(x, float("nan"))
    rmsnorm._run(kernel, x, got, w, EPS, True, "simulator", row=True)
    _assert_close(got, key(x, w), torch.bfloat16)
    assert _within_one_bf16_step(got, rmsnorm.rms_norm(x, w, EPS, row=False, backend="numba"))
    inplace = x.clone()
    rmsnorm._run(kernel, inplace, inplace, w, EPS, True, "simulator", row=True)
    assert torch.equal(inplace, got)


def test_qk_norms_heads_take_the_head_kernel_of_their_row_count(monkeypatch):
    """``rmsnorm.HEAD_LAYOUTS`` on a GPU: 16 threads a head, but 4 threads of 4 heads each at 16k-64k heads; not
    for the fused norm, other widths or dtypes, ``row=False``, or when switched off."""
    def pick(rows, width=128, dtype=torch.bfloat16, fused=False, row=None, where="gpu"):
        return rmsnorm._row_kernel(fused, torch.empty(rows, width, dtype=dtype), True, where, row)

    assert pick(16) is pick(16384) is pick(65537) is pick(262144) is _rmsnorm_vec.head_kernel(16, 1, 256)
    assert pick(16385) is pick(65536) is _rmsnorm_vec.head_kernel(4, 4, 64)
    assert pick(4096, fused=True) is None and pick(4096, row=False) is None and pick(4096, where="simulator") is None
    assert pick(4096, width=64) is None and pick(4096, dtype=torch.float16) is None
    monkeypatch.setattr(rmsnorm, "HEAD_LAYOUTS", ())
    assert pick(4096) is None and pick(16) is _rmsnorm_vec.row_kernels(torch.bfloat16, 1)[0]  # a block per head


def test_the_block_per_row_kernel_is_bf16_and_16_byte_chunks_only():
    x, _, w = _inputs((2, 64), torch.float32, "cpu")
    with pytest.raises(ValueError, match="row=True needs bf16 rows"):
        rmsnorm.rms_norm(x, w, row=True, backend="numba")
    assert rmsnorm._row_kernel(False, x.to(torch.bfloat16), True, "gpu", None) is None  # 8 chunks: a warp's kernel
    wide = torch.empty(2, 1024, dtype=torch.bfloat16)
    assert rmsnorm._row_kernel(True, wide, True, "gpu", None) is _rmsnorm_vec.row_kernels(torch.bfloat16, 4)[1]
    assert rmsnorm._row_kernel(True, wide, True, "simulator", None) is None  # the simulator: only when asked
    heads = torch.empty(16, 16, 128, dtype=torch.bfloat16)  # QK-norm's heads, 16 tokens: a 32-thread block per head
    assert rmsnorm._row_kernel(False, heads, True, "gpu", True) is _rmsnorm_vec.row_kernels(torch.bfloat16, 1)[0]
    assert rmsnorm._row_kernel(False, heads, True, "gpu", None) is _rmsnorm_vec.head_kernel(16, 1, 256)  # by default
    with pytest.MonkeyPatch.context() as patch:  # without the head kernels: a block per head up to 256 heads
        patch.setattr(rmsnorm, "HEAD_LAYOUTS", ())
        assert rmsnorm._row_kernel(False, heads, True, "gpu", None) is _rmsnorm_vec.row_kernels(torch.bfloat16, 1)[0]
        more = torch.empty(17, 16, 128, dtype=torch.bfloat16)  # 272 heads: the warp kernels (several heads a block)
        assert rmsnorm._row_kernel(False, more, True, "gpu", None) is None


def test_empty_batch_and_torch_backend():
    x, r, w = _inputs((0, 16), torch.float32, "cpu")
    assert rmsnorm.rms_norm(x, w).shape == (0, 16)
    x, r, w = _inputs((3, 16), torch.bfloat16, "cpu")
    _assert_close(rmsnorm.rms_norm(x, w, backend="torch"), key(x, w), torch.bfloat16)
    want_x, want_r = key_fused(x, r, w)
    got_x, got_r = rmsnorm.fused_add_rms_norm(x, r, w, backend="torch")
    assert got_x is x and torch.equal(r, want_r)
    _assert_close(x, want_x, torch.bfloat16)


@pytest.mark.parametrize(("items", "rows", "backend", "cap", "want"), [
    (128, 16384, "gpu", 4, (32, 64, 8192)),      # hidden 1024 in bf16: a warp per row, 2 rows per block
    (16, 16384 * 16, "gpu", 4, (4, 64, 16384)),  # a 128-wide bf16 head: 4 threads, 16 heads per block
    (384, 7, "gpu", 4, (128, 128, 7)),           # intermediate 3072 in bf16: a block of 128 per row
    (1024, 8, "gpu", 4, (256, 256, 8)),          # the widest rows the 16-byte kernels take
    (1024, 4096, "gpu", None, (32, 64, 2048)),   # scalar: 32 loads per thread
    (40000, 3, "gpu", None, (1024, 1024, 3)),    # scalar: at most a block of 1024 per row
    (8, 100, "simulator", 4, (8, 32, 4)),        # simulator: at most 4 blocks of 32
    (64, 1, "simulator", 4, (16, 32, 1)),        # ... but never more than 4 chunks per thread
])
def test_launch_config(items, rows, backend, cap, want):
    assert rmsnorm.launch_config(items, rows, backend, cap) == want


# ----------------------------------------------------------------------------- bad arguments
def test_bad_arguments_are_named():
    x, r, w = _inputs((2, 16), torch.float32, "cpu")
    with pytest.raises(TypeError, match="x must have dtype"):
        rmsnorm.rms_norm(x.int(), w.int())
    with pytest.raises(TypeError, match="weight must have dtype"):
        rmsnorm.rms_norm(x, w.half())
    with pytest.raises(ValueError, match=r"weight must have shape \(16\)"):
        rmsnorm.rms_norm(x, w[:8])
    with pytest.raises(ValueError, match="x must be contiguous"):
        rmsnorm.rms_norm(torch.randn(16, 2).t(), w)
    with pytest.raises(ValueError, match="width > 0"):
        rmsnorm.rms_norm(torch.tensor(1.0), w[:1])
    with pytest.raises(ValueError, match="x has shape .* but out has shape"):
        rmsnorm.rms_norm(x, w, out=torch.empty(3, 16))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        rmsnorm.fused_add_rms_norm(x, None, w)
    with pytest.raises(TypeError, match="x has dtype torch.float32 but residual has dtype torch.float16"):
        rmsnorm.fused_add_rms_norm(x, r.half(), w)
    with pytest.raises(ValueError, match="vectorized=True needs rows of whole 16-byte chunks"):
        rmsnorm.rms_norm(torch.randn(2, 6), torch.randn(6), vectorized=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        rmsnorm.rms_norm(x, w, backend="cuda")


# ----------------------------------------------------------------------------- GPU: Qwen3-0.6B shapes
QWEN3 = {"hidden": (1024,), "q heads": (16, 128), "kv heads": (8, 128), "intermediate": (3072,)}


@gpu
@pytest.mark.parametrize("tokens", [1, 7, 4096, 16384])
@pytest.mark.parametrize("what", list(QWEN3))
def test_gpu_bf16_qwen3_shapes(what, tokens):
    x, r, w = _inputs((tokens, *QWEN3[what]), torch.bfloat16, "cuda")
    assert rmsnorm.can_vectorize(x, w, r)
    _assert_close(rmsnorm.rms_norm(x, w, EPS), key(x, w), torch.bfloat16)
    want_x, want_r = key_fused(x, r, w)
    rmsnorm.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(r, want_r)
    _assert_close(x, want_x, torch.bfloat16)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("shape", [(33, 1024), (300, 16, 128), (5, 8192), (3, 40000 // 8 * 8)])
def test_gpu_every_dtype_and_path(shape, vectorized, dtype):
    x, r, w = _inputs(shape, dtype, "cuda")
    if vectorized and not rmsnorm.can_vectorize(x, w):  # 40000 bf16 is more than the registers hold
        vectorized = None
    _assert_close(rmsnorm.rms_norm(x, w, EPS, vectorized=vectorized), key(x, w), dtype)
    want_x, want_r = key_fused(x, r, w)
    rmsnorm.fused_add_rms_norm(x, r, w, EPS, vectorized=vectorized)
    torch.testing.assert_close(r, want_r, atol=0, rtol=0)
    _assert_close(x, want_x, dtype)


@gpu
def test_gpu_misaligned_and_odd_rows_fall_back_to_the_scalar_kernel():
    buf = torch.randn(1 + 64 * 1024, device="cuda", dtype=torch.bfloat16)
    x, w = buf[1:].view(64, 1024), torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    assert not rmsnorm.can_vectorize(x, w)
    _assert_close(rmsnorm.rms_norm(x, w, EPS), key(x, w), torch.bfloat16)
    x, w = torch.randn(100, 1000 + 3, device="cuda", dtype=torch.bfloat16), torch.randn(1003, device="cuda",
                                                                                        dtype=torch.bfloat16)
    _assert_close(rmsnorm.rms_norm(x, w, EPS), key(x, w), torch.bfloat16)


@gpu
def test_gpu_rms_norm_is_captured_by_a_cuda_graph():
    from kernels._timing import capture_graph

    x, r, w = _inputs((16, 1024), torch.bfloat16, "cuda")
    out = torch.empty_like(x)
    graph = capture_graph(lambda: rmsnorm.rms_norm(x, w, EPS, out=out))
    x.copy_(r)
    graph.replay()
    torch.cuda.synchronize()
    _assert_close(out, key(r, w), torch.bfloat16)
