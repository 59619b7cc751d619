"""Every kernel in kernels/ compiles for every supported GPU (sm_80, sm_86, sm_89, sm_90) -- on this CPU-only machine.

The simulator does no type inference, so this is what catches a kernel that would not compile on a GPU.
``kernels._ptx`` lowers each launch signature once, then runs NVVM, NVRTC (the bf16/fp16 shims) and
nvJitLink (ptxas) per target. That the per-target steps can fail for one target only is shown by a
deliberate case: a kernel linking CUDA C++ that reads ``%clusterid`` (Hopper's thread-block clusters).
Both run in subprocesses because numba's real CUDA target cannot be loaded in a process whose numba is the
simulator.
"""

import os
import subprocess
import sys
import textwrap

import kernels._ptx as ptx

ENV = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
TARGET_NAMES = {f"sm_{a}{b}" for a, b in ptx.TARGETS}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=900)


def test_every_kernel_compiles_for_every_target():
    proc = subprocess.run([sys.executable, "-m", "kernels._ptx"], env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    lines = [line for line in proc.stdout.splitlines() if "B of PTX" in line]
    assert {"sm_80", "sm_86", "sm_89", "sm_90"} == TARGET_NAMES
    by_target = {t: [line for line in lines if f" {t} " in line] for t in TARGET_NAMES}
    counts = {t: len(v) for t, v in by_target.items()}
    assert len(set(counts.values())) == 1 and counts["sm_90"] >= 10, counts  # every signature, every target
    modules = {line.split(".")[1] for line in lines}
    assert {"basics", "_vec16", "flash_attention", "paged_attention"} <= modules, proc.stdout[-3000:]
    assert any("B of cubin" in line for line in by_target["sm_80"]), "kernels should be assembled by ptxas"


NEGATIVE = textwrap.dedent('''
    from numba import cuda, types
    from numba.cuda.cudadrv.linkable_code import CUSource
    import kernels._ptx as ptx

    ptx._pretend_device(ptx.TARGETS[0])
    ASM = 'unsigned int v; asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(v)); *out = v; return 0;'
    SOURCES = {
        "always": 'extern "C" __device__ int cx(unsigned int *out) {' + ASM + '}',
        "guarded": 'extern "C" __device__ int cx(unsigned int *out) {\\n#if __CUDA_ARCH__ >= 900\\n' + ASM
                   + '\\n#else\\n*out = 0; return 0;\\n#endif\\n}',
    }
    for name, src in SOURCES.items():
        cx = cuda.declare_device("cx", types.uint32(), link=[CUSource(src)])

        def kernel(out):
            out[0] = cx()

        for cc, _, cubin, err in ptx._Builder(ptx.TARGETS).build(cuda.jit(kernel), (types.uint32[::1],)):
            print(name, f"sm_{cc[0]}{cc[1]}", "ok" if err is None else "FAIL " + err.replace("\\n", " | "))
''')


def test_a_target_specific_instruction_fails_only_where_the_target_lacks_it():
    proc = _python(NEGATIVE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = {tuple(line.split()[:2]): line for line in proc.stdout.splitlines() if line.split()[:1] in (
        ["always"], ["guarded"])}
    for target in ("sm_80", "sm_86", "sm_89"):  # ptxas: Feature '%clusterid' requires .target sm_90 or higher
        assert "FAIL" in result["always", target] and "clusterid" in result["always", target], result
    assert result["always", "sm_90"].endswith(" ok"), result
    # the shim is compiled for each target: its __CUDA_ARCH__ guard takes the fallback below sm_90
    assert all(result["guarded", t].endswith(" ok") for t in TARGET_NAMES), result


def test_every_kernel_module_is_discovered():
    assert "kernels.basics" in ptx.kernel_modules()
