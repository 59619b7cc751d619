"""kernels._index (shift-and-mask index arithmetic) against Python's ``//`` and ``%``; RMSNorm's other bf16 builds
(the ones ``bench.norm_variants`` times) against the reference; the GPU-only benchmarks refuse to time on a CPU."""

import numpy as np
import pytest
import torch
from numba import cuda

from kernels import _rmsnorm_vec as vec
from kernels import rmsnorm as rn
from kernels._env import simulator_enabled
from kernels._index import div_pow2, mod_pow2, pow2_shift

needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the kernel in numba's CUDA simulator")


@cuda.jit
def _index_kernel(xs, ns, out):
    i = cuda.grid(1)
    if i < xs.size:
        s = pow2_shift(ns[i])
        out[i, 0], out[i, 1], out[i, 2] = s, div_pow2(xs[i], ns[i], s), mod_pow2(xs[i], ns[i], s)


@needs_sim
def test_shift_and_mask_give_python_division_for_every_divisor():
    ns = np.array([1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64, 96, 128], dtype=np.int64)
    xs = np.array([0, 1, 2, 3, 7, 15, 16, 17, 31, 33, 100, 127, 128, 1000, 4095, 2**40 + 5], dtype=np.int64)
    x, n = (a.ravel() for a in np.meshgrid(xs, ns))
    out = np.full((x.size, 3), -7, dtype=np.int64)
    _index_kernel[(x.size + 63) // 64, 64](x, n, out)
    pow2 = (n & (n - 1)) == 0
    assert (out[:, 0] == np.where(pow2, np.log2(n).astype(np.int64), -1)).all()
    assert (out[:, 1] == x // n).all() and (out[:, 2] == x % n).all()


@needs_sim
@pytest.mark.parametrize("build", [
    dict(cvt=False, weight_early=False, divide=True),  # the build before the shift, the cvt and the early weight
    dict(cvt=True, weight_early=False, divide=False),
    dict(cvt=True, weight_early=True, divide=False, max_chunks=2),
])
def test_other_bf16_builds_equal_the_reference(build):
    norm, fused = vec.bf16_variant(**build)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 64, generator=gen).to(torch.bfloat16)  # rows of 8 chunks: a group of 2 or 4 threads
    r, w = torch.randn(x.shape, generator=gen).to(torch.bfloat16), torch.randn(64, generator=gen).to(torch.bfloat16)
    chunks = build.get("max_chunks", vec.MAX_CHUNKS)
    out = torch.empty_like(x)
    rn._run(norm, x, out, w, 1e-6, True, "simulator", chunks)
    assert torch.equal(out, rn.rms_norm_ref(x, w, 1e-6))
    a, b = x.clone(), r.clone()
    rn._run(fused, a, b, w, 1e-6, True, "simulator", chunks)
    want_x, want_r = rn.fused_add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(b, want_r) and torch.equal(a, want_x)


@needs_sim
def test_streaming_build_walks_every_row_on_a_small_grid():
    norm, _ = vec.bf16_variant(True, True, 4, False, True)
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(11, 64, generator=gen).to(torch.bfloat16), torch.randn(64, generator=gen).to(torch.bfloat16)
    out = torch.full_like(x, float("nan"))
    rn._run(norm, x, out, w, 1e-6, True, "simulator", max_blocks=2)  # 2 blocks of 4 rows: each block 2 trips
    assert torch.equal(out, rn.rms_norm_ref(x, w, 1e-6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("module", ["bench.kernel_floor", "bench.norm_variants", "bench.profile_decode"])
def test_gpu_benchmarks_refuse_to_time_without_a_gpu(module, tmp_path, capsys):
    import importlib

    from bench import run

    assert module == "bench.profile_decode" or run.BENCHMARKS[module.split(".")[1]][0] == module
    assert importlib.import_module(module).main(["--out", str(tmp_path)]) == 2
    assert "no GPU" in capsys.readouterr().err and not list(tmp_path.iterdir())
