"""The kernel launch layer: backend choice, argument checks, the simulator's warp shuffles, and
phase 01's kernels against PyTorch (simulator on CPU; real GPU when there is one)."""

import numpy as np
import pytest
import torch
from numba import cuda

from kernels import basics
from kernels._checks import check_same, check_tensor
from kernels._env import simulator_enabled
from kernels._launch import launch, resolve_backend

needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the kernels in numba's CUDA simulator")
gpu = pytest.mark.gpu


# ----------------------------------------------------------------------------- backend choice
@needs_sim
def test_cpu_tensors_go_to_the_simulator_unless_torch_is_asked():
    x = torch.zeros(3)
    assert resolve_backend("auto", x) == "simulator"
    assert resolve_backend("numba", x) == "simulator"
    assert resolve_backend("torch", x) == "torch"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("triton", torch.zeros(1))


def test_torch_backend_runs_the_reference_without_numba():
    x, y = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(basics.add(x, y, backend="torch"), x + y)


@gpu
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="one device"):
        resolve_backend("auto", torch.zeros(1), torch.zeros(1, device="cuda"))


# ----------------------------------------------------------------------------- argument checks
def test_check_tensor_names_the_argument():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        check_tensor("x", [1, 2])
    with pytest.raises(TypeError, match=r"weight must have dtype in \(float32, float16\), got int64"):
        check_tensor("weight", torch.zeros(2, dtype=torch.long), dtypes=(torch.float32, torch.float16))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        check_tensor("x", torch.zeros(3), ndim=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\*, 4\), got \(3, 5\)"):
        check_tensor("x", torch.zeros(3, 5), shape=(None, 4))
    with pytest.raises(ValueError, match="x must be contiguous"):
        check_tensor("x", torch.zeros(4, 4).t())
    t = torch.zeros(2, 3)
    assert check_tensor("x", t, shape=(2, None), ndim=2) is t


def test_check_same_names_both_arguments():
    with pytest.raises(ValueError, match="x has shape .* but y has shape"):
        check_same("x", torch.zeros(2), "y", torch.zeros(3))
    with pytest.raises(TypeError, match="x has dtype torch.float32 but y has dtype torch.float16"):
        check_same("x", torch.zeros(2), "y", torch.zeros(2, dtype=torch.half))


def test_launchers_reject_bad_calls():
    with pytest.raises(ValueError, match="y has shape"):
        basics.add(torch.zeros(4), torch.zeros(5))
    with pytest.raises(TypeError, match="x must have dtype"):
        basics.add(torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="threads must be a power of two"):
        basics.block_sum(torch.zeros(8), threads=48)
    with pytest.raises(ValueError, match="src must have 1 dimensions"):
        basics.copy(torch.zeros(2, 2), torch.zeros(2, 2))


def test_launch_refuses_the_torch_backend():
    with pytest.raises(ValueError, match="has no kernel"):
        launch(basics.add_kernel, 1, 32, backend="torch")


# ----------------------------------------------------------------------------- simulator warp shuffles
@cuda.jit
def _shuffle_probe(out, delta):
    tid = cuda.threadIdx.x
    v = tid * 10 + 1
    out[0, tid] = cuda.shfl_down_sync(0xFFFFFFFF, v, delta)
    out[1, tid] = cuda.shfl_up_sync(0xFFFFFFFF, v, delta)
    out[2, tid] = cuda.shfl_xor_sync(0xFFFFFFFF, v, delta)
    out[3, tid] = cuda.shfl_sync(0xFFFFFFFF, v, delta)


def _shuffle_model(n_threads: int, delta: int) -> np.ndarray:
    """What the hardware returns (width 32, out-of-range sources return the caller's own value)."""
    v = np.arange(n_threads) * 10 + 1
    out = np.empty((4, n_threads), dtype=np.int64)
    for t in range(n_threads):
        lane, base = t % 32, t - t % 32
        down, up = lane + delta, lane - delta
        out[0, t] = v[base + down] if down < 32 and base + down < n_threads else v[t]
        out[1, t] = v[base + up] if up >= 0 else v[t]
        out[2, t] = v[base + (lane ^ delta)]
        out[3, t] = v[base + delta % 32]
    return out


@needs_sim
@pytest.mark.parametrize("delta", [1, 3, 16])
def test_simulated_shuffles_match_the_hardware_model(delta):
    out = torch.zeros(4, 64, dtype=torch.int64)
    launch(_shuffle_probe, 1, 64, out, delta, backend="simulator")
    np.testing.assert_array_equal(out.numpy(), _shuffle_model(64, delta))


@cuda.jit
def _barrier_probe(out, partial, early):
    """Block-wide sums through shared memory, a barrier between rounds; threads below ``early`` return first."""
    tid = cuda.threadIdx.x
    if tid < early:
        out[cuda.blockIdx.x, tid] = -1
        return
    buf = cuda.shared.array(64, dtype=np.int64)
    buf[tid] = tid + 1 + cuda.blockIdx.x
    cuda.syncthreads()
    total = 0
    for i in range(early, cuda.blockDim.x):
        total += buf[i]
    cuda.syncthreads()  # nobody writes again before everyone has read
    buf[tid] = total * 2
    cuda.syncthreads()
    out[cuda.blockIdx.x, tid] = buf[(tid + 1 - early) % (cuda.blockDim.x - early) + early] + cuda.shfl_xor_sync(
        0xFFFFFFFF, tid, 1)
    partial[cuda.blockIdx.x] = cuda.syncthreads_count(tid % 3 == 0)


@cuda.jit
def _raising_probe(out):
    tid = cuda.threadIdx.x
    cuda.syncthreads()
    if tid == 5:
        out[100] = 1  # out of bounds: the simulator raises IndexError in this thread
    cuda.syncthreads()
    out[tid] = tid


def _polling(monkeypatch) -> None:
    """numba's own polling barrier back in place for this test: the reference for ours."""
    from numba.cuda.simulator import kernel as sim

    from kernels import _simulator

    _simulator.install()
    manager_run, thread_run, syncthreads = sim.BlockManager.run.polling
    monkeypatch.setattr(sim.BlockManager, "run", manager_run)
    monkeypatch.setattr(sim.BlockThread, "run", thread_run)
    monkeypatch.setattr(sim.BlockThread, "syncthreads", syncthreads)


@needs_sim
@pytest.mark.parametrize("early", [0, 32])
def test_the_event_driven_barrier_gives_numbas_polling_barriers_results(monkeypatch, early):
    ours = torch.zeros(3, 64, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    launch(_barrier_probe, 3, 64, *ours, early, backend="simulator")
    with monkeypatch.context() as m:
        _polling(m)
        ref = torch.zeros(3, 64, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
        launch(_barrier_probe, 3, 64, *ref, early, backend="simulator")
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    live = np.arange(early, 64)  # the threads that reach the barriers
    want = 2 * ((live + 1).sum() + len(live) * np.arange(3))  # per block: twice the block's sum
    assert (ours[0][:, :early] == -1).all()
    np.testing.assert_array_equal(ours[0][:, early:].numpy(), want[:, None] + (live ^ 1))
    assert (ours[1] == int((live % 3 == 0).sum())).all()


@needs_sim
def test_an_exception_in_one_simulated_thread_is_raised_from_the_launch():
    with pytest.raises(IndexError, match=r"tid=\[5, 0, 0\]"):  # the other 31 wait at a barrier: woken, not hung
        launch(_raising_probe, 1, 32, torch.zeros(32, dtype=torch.int64), backend="simulator")
    out = torch.zeros(4, 32, dtype=torch.int64)  # and the next launch runs as usual
    launch(_shuffle_probe, 1, 32, out, 1, backend="simulator")
    np.testing.assert_array_equal(out.numpy(), _shuffle_model(32, 1))


# ----------------------------------------------------------------------------- phase 01 kernels
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n", [1, 31, 64, 200])
def test_add_matches_torch(n):
    x, y = torch.randn(n, device=_device()), torch.randn(n, device=_device())
    torch.testing.assert_close(basics.add(x, y, threads=64, backend="numba"), x + y, rtol=0, atol=0)


@pytest.mark.parametrize("vector_bytes", [4, 16])
@pytest.mark.parametrize("n", [4, 100, 1000])
def test_copy_matches_torch(n, vector_bytes):
    src = torch.randn(n, device=_device())
    dst = torch.zeros_like(src)
    out = basics.copy(src, dst, threads=64, vector_bytes=vector_bytes, backend="numba")
    assert out is dst and torch.equal(dst, src)


def test_copy_half_precision():
    src = torch.randn(300, device=_device()).half()
    assert torch.equal(basics.copy(src, torch.empty_like(src), threads=64, backend="numba"), src)


@pytest.mark.parametrize("kernel", [basics.block_sum, basics.warp_sum])
@pytest.mark.parametrize(("n", "threads", "blocks"), [(1, 32, 1), (100, 64, 2), (1000, 64, 4), (257, 32, 3)])
def test_sums_match_torch(kernel, n, threads, blocks):
    x = torch.randn(n, device=_device())
    got = kernel(x, threads=threads, blocks=blocks, backend="numba")
    torch.testing.assert_close(got, x.double().sum().float().reshape(1), rtol=1e-5, atol=1e-4)


def test_sums_of_half_precision_accumulate_in_float32():
    x = torch.full((512,), 0.1, dtype=torch.half, device=_device())
    want = x.float().sum().reshape(1)  # 51.2 in fp32; a fp16 accumulator would drift
    got = basics.warp_sum(x, threads=64, blocks=2, backend="numba")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- GPU only
@gpu
def test_gpu_large_shapes():
    x = torch.randn(10_000_019, device="cuda")
    torch.testing.assert_close(basics.warp_sum(x), x.double().sum().float().reshape(1), rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(basics.block_sum(x), x.double().sum().float().reshape(1), rtol=1e-4, atol=1e-2)
    dst = torch.empty_like(x[:-3])
    assert torch.equal(basics.copy(x[:-3], dst, vector_bytes=16), x[:-3])


@gpu
def test_gpu_bf16_tensors_are_kernel_arguments():
    src = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(basics.copy(src, torch.empty_like(src)), src)


@gpu
def test_gpu_launch_is_captured_by_a_cuda_graph():
    from kernels._timing import capture_graph

    x = torch.randn(1000, device="cuda")
    y = torch.randn(1000, device="cuda")
    out = torch.zeros(1000, device="cuda")
    graph = capture_graph(lambda: launch(basics.add_kernel, 4, 256, x, y, out, backend="gpu"))
    x.fill_(1.0)
    y.fill_(2.0)
    graph.replay()  # the replay reads the new contents of the static inputs
    torch.cuda.synchronize()
    assert torch.equal(out, torch.full_like(out, 3.0))


@gpu
def test_gpu_launch_on_a_side_stream_uses_that_stream():
    x = torch.randn(1 << 20, device="cuda")
    dst = torch.empty_like(x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        basics.copy(x, dst)
    s.synchronize()
    assert torch.equal(dst, x)


# ----------------------------------------------------------------------------- 16-byte bf16 words
def test_bf16_words_round_trip_with_round_to_nearest_even():
    from kernels import _vec16

    x = torch.randn(64, device=_device()).to(torch.bfloat16)
    x[:4] = torch.tensor([0.0, -0.0, 1e-40, -3.0e37])  # zeros, a subnormal, a large value
    y = torch.empty_like(x)
    launch(_vec16._roundtrip_kernel, 1, 8, x.view(torch.complex128), y.view(torch.complex128), 1.7,
           backend=resolve_backend("numba", x))
    torch.testing.assert_close(y, (x.float() * 1.7).to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_packing_keeps_nan_and_inf():
    from kernels import _vec16

    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 16, device=_device()).to(torch.bfloat16)
    y = torch.empty_like(x)
    launch(_vec16._roundtrip_kernel, 1, 8, x.view(torch.complex128), y.view(torch.complex128), 1.0,
           backend=resolve_backend("numba", x))
    assert y[0::4].isnan().all() and (y[1::4] == float("inf")).all() and (y[2::4] == -float("inf")).all()
    assert (y[3::4] == 1.0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the simulator
def test_bf16_packing_of_a_computed_nan():
    # inf * 0 is NaN; a GPU produces it as 0xFFFFFFFF or 0x7FFFFFFF, whose rounding add overflows
    from kernels import _vec16

    x = torch.full((64,), float("inf"), device=_device()).to(torch.bfloat16)
    y = torch.empty_like(x)
    launch(_vec16._roundtrip_kernel, 1, 8, x.view(torch.complex128), y.view(torch.complex128), 0.0,
           backend=resolve_backend("numba", x))
    assert y.isnan().all()
