"""Compile every kernel in ``kernels/`` for every GPU the course supports (sm_80, sm_86, sm_89, sm_90), on any machine.

The CUDA simulator runs kernels as Python and does no type inference, so a kernel can pass every
simulator test and still fail to compile for a GPU. numba's real CUDA compiler runs without a GPU (it
needs numba-cuda's toolkit extra, ``numba-cuda[cu13]``). Each kernel module lists the signatures it is
launched with in ``SIGNATURES``; this module builds them all for every target and reports any
``@cuda.jit`` function a module forgot to list.

Per signature, the steps a GPU would run at first launch, each done only as often as its result can
differ (measured on 2 cores for all 146 signatures and four targets: typing + lowering 195 s, NVVM ~30 s per
target, assembling and linking 125 s in all, nvdisasm 94 s beside them):

1. **typing and lowering to NVVM IR, once**, for the lowest target. numba-cuda 0.30's lowering reads the
   compute capability only to choose features older than sm_75 (f64 atomics at 6.0, ``tanh.approx``
   at 7.5), so the IR is the same for every target here.
2. **NVVM IR -> PTX for each target** (NVVM checks the IR against that architecture).
3. **the CUDA C++ shims** numba links for bf16/fp16 conversions (``cuda_bf16.h``, whose code branches on
   ``__CUDA_ARCH__``) **compiled by NVRTC for each target**, to LTO-IR (NVRTC's PTX output path asks a
   driver for its version, and there is none here).
4. **assembling and linking each kernel for each target with nvJitLink** (ptxas), as numba does at first
   launch: what rejects an instruction a target lacks, or too much shared memory. A kernel with shims is
   linked as LTO-IR with them (NVVM's ``-gen-lto``), as numba-cuda does by default when nvJitLink is
   present, so the shims are inlined; linked as PTX they would stay calls, their arguments passed through
   local memory. PTX is forward compatible (PTX valid for sm_80 is valid for every later target), so a
   kernel without shims whose PTX text for a later target equals one already assembled is not assembled
   again.

``--ends`` (what ``tests/test_01_compile.py`` runs) builds each kernel for its oldest target and sm_90 only, the
steps above for the targets between left out: PTX that assembles for its oldest target is valid PTX for every
later one, and what a newer target adds (sm_89's fp8 conversions) is built from that target up anyway
(``MIN_TARGETS``). The bf16/fp16 shims' headers (``cuda_bf16.hpp``, ``cuda_fp16.hpp``) branch on ``__CUDA_ARCH__`` at
300 to 800 only, so sm_80, sm_86 and sm_89 compile them alike (``shim_arch_thresholds`` reads them; no
kernel here uses numba's fp8 header, which branches at 890). Shared memory per SM is smaller on sm_86/sm_89,
but that is met at launch, not by the compiler.
``--ends --lean --census PREFIXES`` (what the test suite runs) goes one step further: sm_90 only for the kernels
whose names start with the census prefixes (the engine's GPU kernels, whose sm_90 machine code the tests hold to no
spills and wide loads), every other kernel and device function for its oldest target only, by the same forward
compatibility (sm_90 takes sm_80's PTX; the shims' headers do not branch between 800 and 900). Typing and lowering,
half of a kernel's time, is done once whatever the targets.
Measured on 2 idle cores: ``python -m kernels._ptx`` over all four targets 7 min 27 s (user 8 min 30 s); the
test file with ``--ends`` (and a SASS census of the kernels it reads only) 6 min 7 s (user 6 min 27 s).

For each kernel at sm_90 (Hopper, the GPU the course measures on; always assembled, never skipped as
above) it also reports what ptxas gave the kernel: registers per thread, and so how many warps an SM can hold
(``warps_per_sm``), stack and spill bytes, static shared memory. When NVIDIA's ``nvdisasm`` is installed (the
``nvidia-cuda-nvdisasm`` wheel of the ``test`` extra), a census of the kernel's SASS comes with them: global
loads and stores by width, shared and local memory, tensor-core instructions (``SASS_FAMILIES``).

Run ``python -m kernels._ptx`` (with ``NUMBA_ENABLE_CUDASIM=0``: the simulator has no compiler);
A kernel that needs a newer GPU than the oldest target (an instruction sm_80 lacks) is listed in its module's
``MIN_TARGETS`` (kernel -> the oldest compute capability it is built for) and built from there up.
``--json PATH`` also writes the sm_90 resources and the tools' versions, ``--only kernels.rmsnorm`` builds one
module. Left out: cubins are checked, not kept; resources for the other targets; occupancy as a launch sets it
(block size and shared memory can lower ``warps_per_sm``).
"""

import argparse
import functools
import importlib
import json
import os
import pkgutil
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

TARGETS = ((8, 0), (8, 6), (8, 9), (9, 0))  # Ampere (A100, RTX 30xx), Ada (RTX 40xx), Hopper (H100/H200)
RESOURCES_CC = (9, 0)  # the target whose kernels get Resources: the H200 the course measures on
# SASS opcode families counted (an opcode's first part; HFMA2.MMA is an HFMA2, not a tensor-core instruction):
# global loads/stores (LDG.E.128 is 16 bytes a thread) and generic ones (LD/ST), shared memory (LDS/STS, and
# LDSM: ldmatrix), global -> shared copies (LDGSTS: cp.async), local memory (LDL/STL: spills or local arrays),
# tensor cores (HMMA), fp32 FMAs (FFMA), warp shuffles, MUFU (exp2, rcp, rsqrt...), barriers, and calls of
# functions not inlined (the slow paths of division and sqrt; the bf16/fp16 shims when not linked by LTO, whose
# arguments go through local memory). Opcodes keep all their modifiers: the SASS of these kernels has no
# cache-policy ones (.EL, .LU, .CONSTANT...) on LDG/STG, and LDL.LU (a spill's last read) is local memory all the same.
SASS_FAMILIES = frozenset({"LDG", "STG", "LD", "ST", "LDS", "STS", "LDSM", "LDGSTS", "LDL", "STL", "HMMA", "FFMA",
                           "SHFL", "MUFU", "BAR", "CALL"})


@dataclass(slots=True, frozen=True)
class Resources:
    """What ptxas gave one kernel (its entry function) for one target, and a census of its SASS."""

    registers: int  # per thread
    stack_bytes: int  # local memory per thread: spill slots and local arrays
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int  # static shared memory per block (cuda.shared.array)
    sass: dict[str, int] | None = None  # opcode with modifiers -> count, SASS_FAMILIES only; None: no nvdisasm
    instructions: int | None = None  # SASS instructions, NOP padding left out; None: no nvdisasm
    wide_loop: dict | None = None  # main_loop(): the largest loop with 16-byte global loads; None: none, no nvdisasm


@dataclass(slots=True, frozen=True)
class Compiled:
    module: str
    kernel: str
    signature: str
    cc: tuple[int, int]
    ptx_bytes: int
    cubin_bytes: int | None  # None: a device function (assembled inside the kernels that call it)
    error: str | None = None  # what failed for this target, or None
    resources: Resources | None = None  # kernels at RESOURCES_CC only


def warps_per_sm(registers: int) -> int:
    """How many warps an SM of sm_80..sm_90 can hold, as far as ``registers`` per thread decides it.

    An SM has 65,536 registers in 4 sub-partitions, each giving registers to its warps in units of 256 (8 a
    thread), and holds at most 64 warps (cuda_occupancy.h's rule). A launch's block size and shared memory can
    lower it further.
    """
    if registers == 0:
        return 64
    per_warp = (registers * 32 + 255) // 256 * 256
    return min(64, 4 * (65_536 // 4 // per_warp))


def shim_arch_thresholds() -> set[int]:
    """Every ``__CUDA_ARCH__`` value that numba's bf16/fp16 shim headers compare against (their ``cuda_bf16.hpp``
    and ``cuda_fp16.h[pp]``, for each CUDA major numba-cuda ships headers for)."""
    import numba.cuda

    found = set()
    for header in Path(numba.cuda.__file__).parent.glob("include/*/cuda_[bf][fp]16.h*"):
        for line in header.read_text(errors="replace").splitlines():
            if "__CUDA_ARCH__" in line and line.lstrip().startswith("#"):
                found.update(int(v) for v in re.findall(r"__CUDA_ARCH__\s*[<>=!]=?\s*(\d+)", line))
    return found


def kernel_modules() -> list[str]:
    import kernels

    return [f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__) if m.name != "_ptx"]


def _dispatchers(module) -> dict[str, object]:
    from numba.cuda.dispatcher import CUDADispatcher

    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, CUDADispatcher) and obj.py_func.__module__ == module.__name__}


def _ptx_body(ptx: str) -> str:
    """The PTX without comments and its ``.target`` line: equal bodies assemble alike on later targets."""
    return re.sub(r"^(//.*|\.target .*)$", "", ptx, flags=re.M)


def link(ptxs: list[str], ltoirs: list[bytes], cc: tuple[int, int], verbose: bool = False) -> tuple[bytes, str]:
    """Assemble and link PTX and LTO-IR (a kernel's, and the shims') into a cubin for ``sm_XY`` with nvJitLink:
    the cubin, and the info log (with ``verbose``: ptxas' resource lines, which ``resources`` reads).

    Raises ``RuntimeError`` with ptxas' log when a target rejects the code.
    """
    from cuda.bindings import nvjitlink

    options = [f"-arch=sm_{cc[0]}{cc[1]}"] + (["-lto"] if ltoirs else [])
    options += ["-Xptxas=-v"] if verbose else []  # ptxas' resource lines
    handle = nvjitlink.create(len(options), options)
    try:
        for i, ptx in enumerate(ptxs):
            data = ptx.encode()
            nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), f"kernel{i}.ptx")
        for i, ltoir in enumerate(ltoirs):
            nvjitlink.add_data(handle, nvjitlink.InputType.LTOIR, ltoir, len(ltoir), f"shim{i}.ltoir")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"sm_{cc[0]}{cc[1]}: " + log.decode(errors="replace").strip("\x00").strip()) from None
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        return bytes(cubin), log.decode(errors="replace").strip("\x00")
    finally:
        nvjitlink.destroy(handle)


# ptxas info    : Function properties for NAME
# ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
# ptxas info    : Used 56 registers, used 1 barriers, 128 bytes smem     (no smem part when it is 0)
_PTXAS_LINES = re.compile(r"Function properties for (?P<name>\S+)\s*\n.*?(?P<stack>\d+) bytes stack frame, "
                          r"(?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads\s*\n"
                          r".*?Used (?P<registers>\d+) registers(?:, used \d+ barriers)?"
                          r"(?:, (?P<smem>\d+) bytes smem)?")
# /*0bf0*/   @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;  (a predicate, then the opcode with its modifiers)
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_.]*)([^\n]*)", re.M)  # opcode, operands


@functools.cache
def nvdisasm() -> str | None:
    """NVIDIA's disassembler: the ``nvidia-cuda-nvdisasm`` wheel's (newest CUDA first), else one on PATH."""
    try:
        import nvidia  # the namespace package of NVIDIA's CUDA wheels

        wheels = [p for d in nvidia.__path__ for p in sorted(Path(d).glob("cu*/bin/nvdisasm"), reverse=True)]
    except ImportError:
        wheels = []
    return next((str(p) for p in wheels if os.access(p, os.X_OK)), None) or shutil.which("nvdisasm")


_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):", re.M)


def main_loop(sass: str) -> dict | None:
    """The largest loop of a disassembly that issues 16-byte global loads (``LDG.E.128``): a backward branch to a
    label and the instructions between them, NOPs left out. Returns its ``instructions``, its ``wide_loads`` and
    ``per_8_wide_loads`` (instructions for every 8 of those loads: a decode kernel's cost per 128 bytes a lane
    reads), or None when no loop has such loads. A static count: a branch inside the loop counts both ways."""
    labels, code = {}, []
    for line in sass.splitlines():
        if (m := _SASS_LABEL.match(line)) is not None:
            labels[m[1]] = len(code)
        elif (m := _SASS_LINE.match(line)) is not None and m[1] != "NOP":
            code.append((m[1], m[2]))
    best = None
    for i, (op, rest) in enumerate(code):
        target = re.search(r"(\.L_x_\d+)", rest) if op.startswith("BRA") else None
        if target and labels.get(target[1], i + 1) <= i:
            body = code[labels[target[1]]: i + 1]
            wide = sum(o.startswith("LDG.E.128") for o, _ in body)
            if wide and (best is None or len(body) > best["instructions"]):
                best = {"instructions": len(body), "wide_loads": wide, "per_8_wide_loads": round(8 * len(body) / wide)}
    return best


def sass_census(cubin: bytes) -> tuple[dict[str, int], int, dict | None] | None:
    """The cubin's SASS opcodes in ``SASS_FAMILIES`` (-> count), its number of instructions and its
    :func:`main_loop`; None without ``nvdisasm``. Counts every function in the cubin: the kernel and what it calls
    (e.g. a slow-path sqrt)."""
    tool = nvdisasm()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([tool, "--print-code", "--no-dataflow", str(path)], capture_output=True, text=True,
                              check=True).stdout  # --no-dataflow: the same code, started in 0.4 s instead of 0.55
    opcodes = [op for op, _ in _SASS_LINE.findall(sass) if op != "NOP"]
    census = dict(sorted(Counter(op for op in opcodes if op.split(".")[0] in SASS_FAMILIES).items()))
    return census, len(opcodes), main_loop(sass)


def resources(log: str, entry: str) -> Resources:
    """A kernel's Resources (but its SASS) from the log of ``link(..., verbose=True)``: ptxas' lines for the entry
    function (the shims, when not inlined, have lines of their own)."""
    found = {m["name"]: m for m in _PTXAS_LINES.finditer(log)}
    if entry not in found:
        raise RuntimeError(f"no resource lines for {entry} in nvJitLink's log:\n{log}")
    m = found[entry]
    return Resources(int(m["registers"]), int(m["stack"]), int(m["stores"]), int(m["loads"]), int(m["smem"] or 0))


class _Builder:
    """Lowers a signature once and builds it for each target, reusing what cannot differ."""

    def __init__(self, targets: tuple[tuple[int, int], ...], resources_cc: tuple[int, int] | None = None,
                 between: bool = True, census: tuple[str, ...] | None = None, lean: bool = False) -> None:
        self.targets = tuple(sorted(targets))
        self.resources_cc = resources_cc  # kernels are always assembled for it, and get Resources
        self.between = between  # False: a kernel only for its oldest target, the newest and resources_cc
        self.census_prefixes = census  # None: a SASS census of every kernel with Resources; else of names with these
        self.lean = lean  # True: a kernel whose name has no census prefix (and every device function) only for its
        #                   oldest target (see --lean)
        self.shims: dict[tuple[bytes, tuple[int, int]], bytes] = {}  # (C++ source, cc) -> LTO-IR
        self.assembled: set[str] = set()  # PTX bodies (of kernels without shims) that assembled fine
        # NOTE: nvdisasm takes 0.4 s a cubin, mostly to start: it runs beside the compiler, see add_census
        self.censuses: list[Future] = []  # sass_census of each record with Resources, in the order compile made them
        self.disassembler = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)

    def _shim(self, linkable, cc: tuple[int, int]) -> bytes:
        from numba.cuda.cudadrv import nvrtc
        from numba.cuda.cudadrv.linkable_code import LinkableCode

        obj = LinkableCode.from_path_or_obj(linkable)
        if obj.kind != "cu":
            raise NotImplementedError(f"linking {obj.kind} files is not checked here")
        data = obj.data if isinstance(obj.data, bytes) else obj.data.encode()
        if (data, cc) not in self.shims:
            self.shims[(data, cc)] = bytes(nvrtc.compile(data, obj.name, cc, ltoir=True)[0].code)
        return self.shims[(data, cc)]

    def compile(self, module: str, disp, sig, min_cc: tuple[int, int] | None = None) -> list[Compiled]:
        """One record per target for ``disp`` at ``sig`` (listed in ``module``); ``min_cc``: only targets from it
        up (a kernel whose instructions older GPUs lack, listed in its module's ``MIN_TARGETS``)."""
        from numba.cuda.compiler import _compile_pyfunc_with_fixup

        device = bool(disp.targetoptions.get("device"))
        fastmath = bool(disp.targetoptions.get("fastmath", False))  # compile the flavour that runs
        bounds = disp.targetoptions.get("launch_bounds")  # as the dispatcher compiles it (registers per thread)
        library, _ = _compile_pyfunc_with_fixup(disp.py_func, sig, device=device, fastmath=fastmath,
                                                cc=self.targets[0], abi="numba", launch_bounds=bounds)  # step 1, once
        out = []
        targets = [cc for cc in self.targets if min_cc is None or cc >= min_cc]
        if not self.between:  # what PTX's forward compatibility covers is left out (see --ends)
            targets = [cc for cc in targets if cc in (targets[0], targets[-1], self.resources_cc)]
        if self.lean and (device or not disp.py_func.__name__.startswith(self.census_prefixes or ())):
            targets = targets[:1]  # the same forward compatibility up to sm_90 (see --lean)
        for cc in targets:
            record = functools.partial(Compiled, module, disp.py_func.__name__, str(sig), cc)
            try:
                ptxs = library.get_asm_strs(cc=cc)  # step 2
                shims = [self._shim(f, cc) for f in library._linking_files]  # step 3
                cubin, found = None, None
                if not device:  # step 4
                    body = "".join(map(_ptx_body, ptxs))
                    wanted = cc == self.resources_cc
                    if shims:  # as numba links them at run time (LTO, with nvJitLink): the shims are inlined
                        data, log = link([], [bytes(library.get_ltoir(cc=cc)), *shims], cc, verbose=wanted)
                    elif wanted or body not in self.assembled:
                        data, log = link(ptxs, [], cc, verbose=wanted)
                    if shims or wanted or body not in self.assembled:
                        cubin = len(data)
                        if wanted:
                            found = resources(log, re.search(r"\.entry\s+(\S+?)\s*\(", "".join(ptxs))[1])
                            name = disp.py_func.__name__
                            self.censuses.append(self.disassembler.submit(sass_census, data) if self.census_prefixes
                                                 is None or name.startswith(self.census_prefixes) else None)
                        if not shims:
                            self.assembled.add(body)
                    else:
                        cubin = 0  # same PTX as a lower target that assembled: forward compatible
                out.append(record(sum(len(p) for p in ptxs), cubin, resources=found))
            except Exception as e:  # noqa: BLE001 - reported per target, the caller decides
                out.append(record(0, None, f"{type(e).__name__}: {e}"))
        return out

    def add_census(self, done: list[Compiled]) -> list[Compiled]:
        """``done`` (all that ``compile`` returned, in order) with the SASS census of each record that has
        Resources; waits for nvdisasm. (Records are matched by order: a factory's kernels can share a name.)"""
        assert sum(c.resources is not None for c in done) == len(self.censuses), "not all of compile's records"
        censuses = iter(self.censuses)
        self.censuses = []
        out = []
        for c in done:
            future = next(censuses) if c.resources else None
            census = None if future is None else future.result()
            out.append(replace(c, resources=replace(c.resources, sass=census[0], instructions=census[1],
                                                    wide_loop=census[2])) if census else c)
        return out

    def build(self, disp, sig) -> list[tuple[tuple[int, int], int, int | None, str | None]]:
        """(cc, PTX bytes, cubin bytes or None, error or None) for every target."""
        return [(c.cc, c.ptx_bytes, c.cubin_bytes, c.error) for c in self.compile(disp.py_func.__module__, disp, sig)]


def _pretend_device(cc: tuple[int, int]) -> None:
    """Device functions called from a kernel are typed for "the current device"; without a GPU there is none,
    so name the target we lower for. (The PTX itself is made for each target explicitly.)"""
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    if not cuda.is_available():
        dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)


def compile_all(targets: tuple[tuple[int, int], ...] = TARGETS, resources_cc: tuple[int, int] | None = RESOURCES_CC,
                only: list[str] | None = None, between: bool = True,
                census: tuple[str, ...] | None = None, lean: bool = False) -> tuple[list[Compiled], list[str]]:
    """Build every listed signature (of the ``only`` modules, if given) for every target (with ``between=False``:
    its oldest and the newest only); return the results and the names of unlisted kernels. ``census``: kernel-name
    prefixes whose SASS is counted (None: all)."""
    from numba import config

    if config.ENABLE_CUDASIM:
        raise RuntimeError("compile_all needs numba's real CUDA target: run with NUMBA_ENABLE_CUDASIM=0")
    builder = _Builder(targets, resources_cc, between, census, lean)
    _pretend_device(builder.targets[0])
    modules = {name: importlib.import_module(name) for name in kernel_modules()}
    # NOTE: a dispatcher counts as listed wherever it is listed (rmsnorm lists the _reduce helper it imports)
    listed = {disp for m in modules.values() for disp in getattr(m, "SIGNATURES", {})}
    chosen = {name: m for name, m in modules.items() if only is None or name in only}
    missing = [f"{name}.{attr}" for name, m in chosen.items() for attr, disp in _dispatchers(m).items()
               if disp not in listed]
    done = []
    for name, module in chosen.items():
        for disp, sigs in getattr(module, "SIGNATURES", {}).items():
            for sig in sigs:
                done += builder.compile(name, disp, sig, getattr(module, "MIN_TARGETS", {}).get(disp))
    return builder.add_census(done), missing


def _summary(r: Resources) -> str:
    """``96 regs (20 warps/SM), 0 B spilled, LDG.E.128 x8, HMMA x128``: what a line of the report has room for."""
    parts = [f"{r.registers} regs ({warps_per_sm(r.registers)} warps/SM)", f"{r.spill_store_bytes} B spilled"]
    if r.stack_bytes:
        parts.append(f"{r.stack_bytes} B stack")
    if r.smem_bytes:
        parts.append(f"{r.smem_bytes} B smem")
    families = Counter()
    for op, n in (r.sass or {}).items():
        family = op.split(".")[0]
        if family in ("LDG", "STG"):
            parts.append(f"{op} x{n}")
        families[{"LDL": "LDL/STL", "STL": "LDL/STL"}.get(family, family)] += n
    parts += [f"{f} x{families[f]}" for f in ("HMMA", "LDSM", "LDL/STL") if families[f]]
    return ", ".join(parts)


def _meta(argv: list[str]) -> dict:
    """When, where and with which tools a report was made."""
    from importlib.metadata import PackageNotFoundError, version

    from cuda.bindings import nvjitlink

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    tool = nvdisasm()
    lines = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines() if tool else []
    release = next((line for line in lines if "release" in line), None)  # Cuda compilation tools, release 13.5, ...
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m kernels._ptx", *argv]),
            "versions": {name: package(name) for name in ("numba", "numba-cuda", "cuda-bindings", "nvidia-nvjitlink",
                                                          "nvidia-cuda-nvdisasm")}
            | {"nvjitlink (ptxas)": ".".join(map(str, nvjitlink.version())), "nvdisasm": release},
            "nvdisasm": tool,
            "host": {"name": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}}


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels._ptx", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the sm_90 kernels' resources here")
    parser.add_argument("--only", metavar="MODULE[,MODULE]", help="build these kernel modules only (kernels.rope)")
    parser.add_argument("--ends", action="store_true",
                        help="each kernel for its oldest target and sm_90 only (what the test suite runs; 6 against "
                             "7.5 min on 2 cores): PTX that assembles for sm_80 is valid for sm_86 and sm_89 unchanged")
    parser.add_argument("--census", metavar="PREFIX[,PREFIX]",
                        help="count the SASS of kernels whose names start with these only (nvdisasm: ~0.4 s a kernel)")
    parser.add_argument("--lean", action="store_true",
                        help="with --ends and --census (what the test suite runs): sm_90 only for the kernels the "
                             "census names, every other kernel for its oldest target only (valid PTX there is valid "
                             "PTX for every later target)")
    args = parser.parse_args(argv)
    only = None if args.only is None else [m if m.startswith("kernels.") else f"kernels.{m}"
                                           for m in args.only.split(",")]
    if only is not None and (unknown := set(only) - set(kernel_modules())):
        parser.error(f"not a kernel module: {', '.join(sorted(unknown))}")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
    census = None if args.census is None else tuple(args.census.split(","))
    if args.lean and (census is None or not args.ends):
        parser.error("--lean needs --ends and --census (the kernels still built for sm_90)")
    done, missing = compile_all(only=only, between=not args.ends, census=census, lean=args.lean)
    for c in done:
        where = f"{c.module}.{c.kernel}{'':<4}{c.signature:<60} sm_{c.cc[0]}{c.cc[1]}"
        if c.error:
            print(f"{where} FAILED: {c.error}")
        else:
            cubin = "device function" if c.cubin_bytes is None else (
                "same PTX as a lower target" if c.cubin_bytes == 0 else f"{c.cubin_bytes} B of cubin")
            suffix = f" | {_summary(c.resources)}" if c.resources else ""
            print(f"{where} {c.ptx_bytes:>7} B of PTX, {cubin}{suffix}")
    for m in missing:
        print(f"NOT COMPILED (add it to SIGNATURES): {m}")
    if args.json:
        kernels = [{"module": c.module, "kernel": c.kernel, "signature": c.signature, "cc": f"sm_{c.cc[0]}{c.cc[1]}",
                    "resources": asdict(c.resources), "warps_per_sm": warps_per_sm(c.resources.registers)}
                   for c in done if c.resources]
        targets = "oldest; sm_90 for the census" if args.lean else "oldest and sm_90" if args.ends else "all"
        meta = _meta(argv) | {"targets": targets, "census": census}
        args.json.write_text(json.dumps({"meta": meta, "kernels": kernels}, indent=1) + "\n")
    return 1 if missing or any(c.error for c in done) else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
