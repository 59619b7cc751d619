"""minivllm.course.machine_code: a notebook's kernel compiled for sm_90 in a subprocess, its ptxas resources and
SASS read back. Checked on two kernels whose difference is known: the same sum through a local array indexed by a
run-time bound (local memory) and by a constant one (registers); and a kernel calling another device function
gets a clear error. The census needs nvdisasm (the test extra): without it, those checks are skipped."""

import numba
import pytest
from numba import cuda

from minivllm.course.machine_code import count, machine_code

N = 16  # a notebook-style constant the kernels read


@cuda.jit
def _runtime_indexed(x, out):
    acc = cuda.local.array(64, numba.float32)
    i = cuda.grid(1)
    for d in range(x.shape[1]):  # the bound arrives at run time: acc cannot be registers
        acc[d] = numba.float32(x[i, d]) * N
    s = numba.float32(0.0)
    for d in range(x.shape[1]):
        s += acc[d]
    out[i] = s


@cuda.jit
def _constant_indexed(x, out):
    acc = cuda.local.array(N, numba.float32)
    i = cuda.grid(1)
    for d in range(N):  # a constant bound: unrolled, acc lives in registers
        acc[d] = numba.float32(x[i, d]) * N
    s = numba.float32(0.0)
    for d in range(N):
        s += acc[d]
    out[i] = s


@cuda.jit(device=True)
def _helper(v):
    return v * 2


@cuda.jit
def _calls_a_helper(x, out):
    out[0] = _helper(x[0])


SIG = "void(float32[:, ::1], float32[::1])"


def test_local_arrays_show_as_local_memory_and_registers_as_none():
    local, regs = machine_code(_runtime_indexed, SIG), machine_code(_constant_indexed, SIG, constants={"N": 8})
    assert local["stack_bytes"] >= 64 * 4 and regs["stack_bytes"] == 0, (local, regs)
    assert 0 < regs["registers"] <= 255 and local["spill_store_bytes"] == regs["spill_store_bytes"] == 0
    if local["sass"] is None:
        pytest.skip("no SASS census: nvdisasm is not installed (pip install nvidia-cuda-nvdisasm)")
    assert count(local, "STL") > 0 and count(local, "LDL") > 0 and count(regs, "STL") == count(regs, "LDL") == 0
    assert count(regs, "LDG") == 8  # constants= reached the compile: N = 8 loads of x, not 16


def test_a_kernel_calling_a_device_function_is_refused_clearly():
    with pytest.raises(ValueError, match="calls _helper"):
        machine_code(_calls_a_helper, "void(float32[::1], float32[::1])")


def test_without_the_toolkit_wheels_it_says_what_to_install(monkeypatch):
    import importlib.util

    from minivllm.course import machine_code as mc

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cuda.bindings" else real(name, *a))
    with pytest.raises(mc.ToolchainMissing, match=r"numba-cuda\[cu13\]"):
        machine_code(_constant_indexed, SIG)


@pytest.mark.gpu
def test_on_a_gpu_machine_notebook_07s_report_compiles():
    """Notebook 07's cell on a machine with a GPU: the package's flash-attention kernel at the notebook's signature.
    The subprocess hides the GPU, so this machine compiles for sm_90 as a laptop does."""
    from kernels import flash_attention as fa

    sig = ("void(bfloat16[:, :, ::1], bfloat16[:, :, ::1], bfloat16[:, :, ::1], bfloat16[:, :, ::1], "
           "int32[::1], int32[::1], float32, boolean, int64)")
    code = machine_code(fa.flash_attention_kernel, sig)
    assert 0 < code["registers"] <= 255 and code["warps_per_sm"] > 0, code
