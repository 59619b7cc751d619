"""Every kernel in kernels/ compiles for every supported GPU (sm_80, sm_86, sm_89, sm_90) -- on this CPU-only machine.

The simulator does no type inference, so this is what catches a kernel that would not compile on a GPU.
``kernels._ptx`` lowers each launch signature once, then runs NVVM, NVRTC (the bf16/fp16 shims) and
nvJitLink (ptxas) per target. The suite runs it with ``--ends --lean``: each kernel for its oldest target, and the
engine's GPU kernels (those whose sm_90 machine code the tests below hold: the census prefixes) for sm_90 too; the
other targets are covered by PTX's forward compatibility (which holds only while the shims' headers do not branch
between sm_80 and sm_90: checked below); ``python -m kernels._ptx`` builds all four for every kernel. That the
per-target steps can fail for one target only is shown by a deliberate case: a kernel linking CUDA C++ that
reads ``%clusterid`` (Hopper's thread-block clusters).
Both run in subprocesses because numba's real CUDA target cannot be loaded in a process whose numba is the
simulator.

The same run reports each kernel's resources at sm_90 (registers, spills) and, with NVIDIA's ``nvdisasm`` (the
``nvidia-cuda-nvdisasm`` wheel of the ``test`` extra), a census of its SASS: the tests below hold named kernels
to no spills, 16-byte loads and tensor cores. Without nvdisasm those skip and say so, except on CI
(``CI=true``, as ``.ci/run`` runs), where it fails the run.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import kernels._ptx as ptx

ENV = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
TARGET_NAMES = {f"sm_{a}{b}" for a, b in ptx.TARGETS}

# What the sm_90 SASS of named kernels must keep (kernel-name prefixes; one line an entry): the engine's GPU kernels.
# Decode attention: the three variants the engine launches (bf16, and an fp8 cache by masks and shifts on sm_80 or by
# the hardware's conversion on sm_89+, each with the fused merge); the others (bench.paged_decode's alternatives) are
# compiled for their oldest target like every kernel. Prefill: the tensor-core kernels in bf16, Qwen3's dtype.
DECODE = ["paged_decode16_fused_", "paged_decode16_fp8h2_fused_", "paged_decode16_fp8cvth2_fused_"]
NO_SPILLS = [  # no spill stores and no local memory (LDL/STL)
    "rms_norm_bf16_kernel",
    "fused_add_rms_norm_bf16_kernel",
    "rms_norm_row_bf16_w4_kernel",
    "fused_add_rms_norm_row_bf16_w4_kernel",
    "rms_norm_heads_bf16_",
    "qkv_prep_kernel",
    "qkv_prep_fp8_kernel",
    "qkv_prep_vec_",
    "store_kv_fp8_kernel",
    "rope_bf16_kernel",
    "silu_and_mul_bf16_kernel",
    *DECODE,
    "paged_decode_prep_",  # decode attention that prepares its own q, k and v (its engine switch is off by default)
    "flash_mma_bf16_",  # head_dim 128 spilled 1,288 bytes a thread until its fragment addresses stopped being hoisted
    "flash_mma_async_bf16_",
    "gemv_bf16_",
]
WIDE_LOADS = {  # at least this many 16-byte global loads (LDG.E.128), one for each tensor read that way
    "rms_norm_bf16_kernel": 2,  # x, weight
    "fused_add_rms_norm_bf16_kernel": 3,  # x, residual, weight
    "rms_norm_row_bf16_w4_kernel": 2,
    "fused_add_rms_norm_row_bf16_w4_kernel": 3,
    "rms_norm_heads_bf16_": 2,  # x, weight
    "rope_bf16_kernel": 2,  # the head, cos / sin
    "silu_and_mul_bf16_kernel": 2,  # gate, up
    **{prefix: 2 for prefix in DECODE},  # K, V (numba's own complex128 access would be two 8-byte loads each)
    "paged_decode_prep_": 4,  # K, V, the qkv row, the norm's weights
    "flash_mma_bf16_": 2,  # K, V (the pipelined flash_mma_async_* copies them with cp.async instead: LDGSTS)
    "gemv_bf16_": 2,  # the weight row, x
}
TENSOR_CORES = [  # tensor-core matrix multiplies (HMMA)
    "flash_mma_bf16_",
    "flash_mma_async_bf16_",
]
ASYNC_COPIES = [  # K and V copied global -> shared by cp.async (LDGSTS) and read back by ldmatrix (LDSM)
    "flash_mma_async_bf16_",
]
NO_NVDISASM = "nvdisasm is not installed (pip install nvidia-cuda-nvdisasm, in the test extra): no SASS census"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=900)


def _missing(reason: str) -> None:
    (pytest.fail if os.environ.get("CI", "").lower() in ("true", "1") else pytest.skip)(reason)


@pytest.fixture(scope="module")
def compile_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict | None]:
    """One ``python -m kernels._ptx --json`` (minutes) for the tests of this file: its process and its report."""
    path = tmp_path_factory.mktemp("ptx") / "resources.json"
    census = sorted({*NO_SPILLS, *WIDE_LOADS, *TENSOR_CORES, *ASYNC_COPIES})  # every prefix a test below reads
    proc = subprocess.run([sys.executable, "-m", "kernels._ptx", "--ends", "--lean", "--census", ",".join(census),
                           "--json", str(path)], env=ENV, capture_output=True, text=True, timeout=900)
    return proc, json.loads(path.read_text()) if path.exists() else None


@pytest.fixture(scope="module")
def report(compile_run) -> dict:
    """The sm_90 kernels' resources that run wrote."""
    proc, report = compile_run
    assert report is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return report


@pytest.fixture(scope="module")
def census(report) -> dict:
    """The report, which has a SASS census of every kernel when nvdisasm is installed."""
    if report["meta"]["nvdisasm"] is None:
        _missing(NO_NVDISASM)
    return report


def _kernels(report: dict, prefix: str) -> list[dict]:
    found = [k for k in report["kernels"] if k["kernel"].startswith(prefix)]
    assert found, f"no kernel named {prefix}* at sm_90"
    return found


def _count(sass: dict[str, int], family: str, modifier: str | None = None) -> int:
    """Instructions of an opcode family (``LDG``), those with ``modifier`` (``128``) only if given."""
    return sum(n for op, n in sass.items()
               if op.split(".")[0] == family and (modifier is None or modifier in op.split(".")[1:]))


def test_every_kernel_compiles_for_its_oldest_target_and_the_engines_for_sm_90(compile_run, report):
    proc, _ = compile_run
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    lines = [line for line in proc.stdout.splitlines() if "B of PTX" in line]
    assert {"sm_80", "sm_86", "sm_89", "sm_90"} == TARGET_NAMES
    by_target = {t: [line.split(f" {t} ")[0].split() for line in lines if f" {t} " in line] for t in TARGET_NAMES}
    by_target = {t: {(words[0], " ".join(words[1:])) for words in v} for t, v in by_target.items()}  # kernel, sig
    kernels = {(line.split(f" {t} ")[0].split()[0]) for t in TARGET_NAMES for line in lines
               if f" {t} " in line and "device function" not in line}
    engine = tuple(report["meta"]["census"])  # module.kernel names: the kernel's name after the last dot
    named = {k for k in kernels if k.rsplit(".", 1)[1].startswith(engine)}
    # every signature for its oldest target: sm_80, but a kernel listed in its module's MIN_TARGETS from there up
    newer = {k for k, _ in by_target["sm_89"]}
    assert len(newer) == 4 and all("paged_decode16_fp8cvt" in k for k in newer), newer  # e4m3 widened in hardware
    #   (fp32 arithmetic and fp16 pairs at Qwen3's shape; fp16 pairs with the fused merge at Qwen3's and SmolLM2's)
    assert not by_target["sm_86"] and not {k for k, _ in by_target["sm_80"]} & newer
    assert by_target["sm_90"] - by_target["sm_80"] <= by_target["sm_89"]  # of those, the engine's at sm_90 too
    # sm_90 too for exactly the engine's kernels (the census names); the rest, forward compatible, at their oldest
    assert {k for k, _ in by_target["sm_90"]} == named and {k for k, _ in by_target["sm_80"]} >= kernels - newer
    assert all(sig in by_target["sm_90"] for sig in by_target["sm_80"] if sig[0] in named)
    assert len(by_target["sm_90"]) >= 10 and len(by_target["sm_80"] - by_target["sm_90"]) >= 10, by_target
    modules = {line.split(".")[1] for line in lines}
    assert {"basics", "_vec16", "flash_attention", "paged_attention"} <= modules, proc.stdout[-3000:]
    assert any("B of cubin" in line for line in lines if " sm_80 " in line), "kernels should be assembled by ptxas"


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
    for cc, _, cubin, err in ptx._Builder(ptx.TARGETS, between=False).build(cuda.jit(kernel), (types.uint32[::1],)):
        print("ends", f"sm_{cc[0]}{cc[1]}", "ok" if err is None else "FAIL")
''')


def test_a_target_specific_instruction_fails_only_where_the_target_lacks_it():
    proc = _python(NEGATIVE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = {tuple(line.split()[:2]): line for line in proc.stdout.splitlines() if line.split()[:1] in (
        ["always"], ["guarded"], ["ends"])}
    for target in ("sm_80", "sm_86", "sm_89"):  # ptxas: Feature '%clusterid' requires .target sm_90 or higher
        assert "FAIL" in result["always", target] and "clusterid" in result["always", target], result
    assert result["always", "sm_90"].endswith(" ok"), result
    # the shim is compiled for each target: its __CUDA_ARCH__ guard takes the fallback below sm_90
    assert all(result["guarded", t].endswith(" ok") for t in TARGET_NAMES), result
    assert {t for k, t in result if k == "ends"} == {"sm_80", "sm_90"}, result  # between=False: the ends only


def test_the_shims_compile_alike_from_sm_80_to_sm_89():
    """What lets the suite skip sm_86 and sm_89: numba's bf16/fp16 shim headers take no branch between sm_80 and
    sm_90 (headers of a new numba-cuda that did would need ``python -m kernels._ptx`` without ``--ends``)."""
    found = ptx.shim_arch_thresholds()
    assert 800 in found and not {v for v in found if 800 < v < 900}, sorted(found)


def test_every_kernel_module_is_discovered():
    assert "kernels.basics" in ptx.kernel_modules()


def test_every_kernel_reports_its_resources_at_sm_90(compile_run, report):
    lines = [line for line in compile_run[0].stdout.splitlines() if " sm_90 " in line and "B of cubin" in line]
    assert len(report["kernels"]) == len(lines) >= 10, (len(report["kernels"]), len(lines))
    assert all(" regs (" in line for line in lines), lines[:3]
    registers = {(k["kernel"], k["signature"]): k["resources"]["registers"] for k in report["kernels"]}
    assert all(0 < r <= 255 for r in registers.values()), registers
    assert all(k["warps_per_sm"] == ptx.warps_per_sm(k["resources"]["registers"]) for k in report["kernels"])
    if report["meta"]["nvdisasm"] is None:
        _missing(NO_NVDISASM)
    counted = tuple(report["meta"]["census"])  # the prefixes compile_run asked a SASS census for
    without = [(k["kernel"], k["signature"]) for k in report["kernels"]
               if k["kernel"].startswith(counted) and not k["resources"]["instructions"]]
    assert not without and any(k["resources"]["instructions"] for k in report["kernels"]), without
    assert all(k["resources"]["sass"] is None for k in report["kernels"] if not k["kernel"].startswith(counted))


@pytest.mark.parametrize("prefix", NO_SPILLS)
def test_kernel_does_not_spill(census, prefix):
    for k in _kernels(census, prefix):
        r = k["resources"]
        local = _count(r["sass"], "LDL") + _count(r["sass"], "STL")
        assert r["spill_store_bytes"] == 0 and local == 0, (k["signature"], r)


@pytest.mark.parametrize("prefix,minimum", WIDE_LOADS.items())
def test_kernel_loads_16_bytes_a_thread(census, prefix, minimum):
    for k in _kernels(census, prefix):
        assert _count(k["resources"]["sass"], "LDG", "128") >= minimum, (k["signature"], k["resources"]["sass"])


@pytest.mark.parametrize("prefix", TENSOR_CORES)
def test_kernel_uses_tensor_cores(census, prefix):
    for k in _kernels(census, prefix):
        assert _count(k["resources"]["sass"], "HMMA") > 0, (k["signature"], k["resources"]["sass"])


def test_warps_per_sm_follows_cuda_occupancy():
    # cuda_occupancy.h: 4 sub-partitions of 16,384 registers, given to warps 256 at a time; 64 warps at most
    assert [ptx.warps_per_sm(r) for r in (0, 32, 40, 96, 128, 168, 255)] == [64, 64, 48, 20, 16, 12, 8]


@pytest.mark.parametrize("prefix", ASYNC_COPIES)
def test_kernel_copies_tiles_asynchronously(census, prefix):
    for k in _kernels(census, prefix):
        sass = k["resources"]["sass"]
        assert _count(sass, "LDGSTS", "128") > 0 and _count(sass, "LDSM") > 0, (k["signature"], sass)


def test_main_loop_is_the_largest_loop_with_16_byte_loads():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0050*/                   FFMA R3, R4, R5, R3 ;
        /*0060*/                   NOP ;
        /*0070*/               @P1 BRA `(.L_x_1) ;
        /*0080*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0090*/                   EXIT ;
"""
    assert ptx.main_loop(sass) == {"instructions": 4, "wide_loads": 2, "per_8_wide_loads": 16}
    assert ptx.main_loop(sass.replace("LDG.E.128", "LDG.E")) is None  # no 16-byte loads: no main loop


def test_fp8_decode_in_fp16_pairs_costs_what_the_bf16_kernel_does_per_byte(census):
    """Per 8 of its 16-byte loads (128 bytes a lane), the engine's fp8 decode kernels' main loop: masks and shifts
    (the sm_80 kernel) cost ~1.14x the bf16 kernel's instructions even with fp16 pairs (with fp32 arithmetic it was
    ~1.3x, the cost that kept the fp8 kernel from its floor); the hardware conversion, the default on sm_89+, about
    the same as bf16."""
    def per_byte(prefix):
        return next(k for k in _kernels(census, prefix) if "_g2_d128_" in k["kernel"])["resources"]["wide_loop"][
            "per_8_wide_loads"]

    bf16, shift, pairs = (per_byte(p) for p in DECODE)
    assert shift > 1.08 * bf16 and pairs <= 1.05 * bf16, (bf16, shift, pairs)
