"""Compile every kernel in ``kernels/`` for every GPU the course supports (sm_80, sm_86, sm_89, sm_90), on any machine.

The CUDA simulator runs kernels as Python and does no type inference, so a kernel can pass every
simulator test and still fail to compile for a GPU. numba's real CUDA compiler runs without a GPU (it
needs numba-cuda's toolkit extra, ``numba-cuda[cu13]``). Each kernel module lists the signatures it is
launched with in ``SIGNATURES``; this module builds them all for every target and reports any
``@cuda.jit`` function a module forgot to list.

Per signature, the steps a GPU would run at first launch, each done only as often as its result can
differ (measured on 2 cores for all 91 signatures: typing + lowering ~65 s, NVVM ~13 s per target,
assembling ~17 s per target):

1. **typing and lowering to NVVM IR, once**, for the lowest target. numba-cuda 0.30's lowering reads the
   compute capability only to choose features older than sm_75 (f64 atomics at 6.0, ``tanh.approx``
   at 7.5), so the IR is the same for every target here.
2. **NVVM IR -> PTX for each target** (NVVM checks the IR against that architecture).
3. **the CUDA C++ shims** numba links for bf16/fp16 conversions (``cuda_bf16.h``, whose code branches on
   ``__CUDA_ARCH__``) **compiled by NVRTC for each target**, to LTO-IR (NVRTC's PTX output path asks a
   driver for its version, and there is none here).
4. **assembling and linking each kernel for each target with nvJitLink** (ptxas), as the driver does at
   load time: what rejects an instruction a target lacks, or too much shared memory. PTX is forward
   compatible (PTX valid for sm_80 is valid for every later target), so a kernel without shims whose PTX
   text for a later target equals one already assembled is not assembled again.

Run ``python -m kernels._ptx`` (with ``NUMBA_ENABLE_CUDASIM=0``: the simulator has no compiler).
Left out: cubins are checked, not kept; register counts and occupancy are not reported.
"""

import importlib
import os
import pkgutil
import re
import sys
from dataclasses import dataclass
from types import SimpleNamespace

TARGETS = ((8, 0), (8, 6), (8, 9), (9, 0))  # Ampere (A100, RTX 30xx), Ada (RTX 40xx), Hopper (H100/H200)


@dataclass(slots=True, frozen=True)
class Compiled:
    module: str
    kernel: str
    signature: str
    cc: tuple[int, int]
    ptx_bytes: int
    cubin_bytes: int | None  # None: a device function (assembled inside the kernels that call it)
    error: str | None = None  # what failed for this target, or None


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


def link(ptxs: list[str], ltoirs: list[bytes], cc: tuple[int, int]) -> int:
    """Assemble and link PTX (and LTO-IR shims) into a cubin for ``sm_XY`` with nvJitLink; its size in bytes.

    Raises ``RuntimeError`` with ptxas' log when a target rejects the code.
    """
    from cuda.bindings import nvjitlink

    options = [f"-arch=sm_{cc[0]}{cc[1]}"] + (["-lto"] if ltoirs else [])
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
        return nvjitlink.get_linked_cubin_size(handle)
    finally:
        nvjitlink.destroy(handle)


class _Builder:
    """Lowers a signature once and builds it for each target, reusing what cannot differ."""

    def __init__(self, targets: tuple[tuple[int, int], ...]) -> None:
        self.targets = tuple(sorted(targets))
        self.shims: dict[tuple[bytes, tuple[int, int]], bytes] = {}  # (C++ source, cc) -> LTO-IR
        self.assembled: set[str] = set()  # PTX bodies (of kernels without shims) that assembled fine

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

    def build(self, disp, sig) -> list[tuple[tuple[int, int], int, int | None, str | None]]:
        """(cc, PTX bytes, cubin bytes or None, error or None) for every target."""
        from numba.cuda.compiler import _compile_pyfunc_with_fixup

        device = bool(disp.targetoptions.get("device"))
        fastmath = bool(disp.targetoptions.get("fastmath", False))  # compile the flavour that runs
        library, _ = _compile_pyfunc_with_fixup(disp.py_func, sig, device=device, fastmath=fastmath,
                                                cc=self.targets[0], abi="numba")  # step 1, once
        out = []
        for cc in self.targets:
            try:
                ptxs = library.get_asm_strs(cc=cc)  # step 2
                shims = [self._shim(f, cc) for f in library._linking_files]  # step 3
                cubin = None
                if not device:  # step 4
                    body = "".join(map(_ptx_body, ptxs))
                    if shims or body not in self.assembled:
                        cubin = link(ptxs, shims, cc)
                        if not shims:
                            self.assembled.add(body)
                    else:
                        cubin = 0  # same PTX as a lower target that assembled: forward compatible
                out.append((cc, sum(len(p) for p in ptxs), cubin, None))
            except Exception as e:  # noqa: BLE001 - reported per target, the caller decides
                out.append((cc, 0, None, f"{type(e).__name__}: {e}"))
        return out


def _pretend_device(cc: tuple[int, int]) -> None:
    """Device functions called from a kernel are typed for "the current device"; without a GPU there is none,
    so name the target we lower for. (The PTX itself is made for each target explicitly.)"""
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    if not cuda.is_available():
        dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)


def compile_all(targets: tuple[tuple[int, int], ...] = TARGETS) -> tuple[list[Compiled], list[str]]:
    """Build every listed signature for every target; return the results and the names of unlisted kernels."""
    from numba import config

    if config.ENABLE_CUDASIM:
        raise RuntimeError("compile_all needs numba's real CUDA target: run with NUMBA_ENABLE_CUDASIM=0")
    builder = _Builder(targets)
    _pretend_device(builder.targets[0])
    modules = {name: importlib.import_module(name) for name in kernel_modules()}
    # NOTE: a dispatcher counts as listed wherever it is listed (rmsnorm lists the _reduce helper it imports)
    listed = {disp for m in modules.values() for disp in getattr(m, "SIGNATURES", {})}
    missing = [f"{name}.{attr}" for name, m in modules.items() for attr, disp in _dispatchers(m).items()
               if disp not in listed]
    done = []
    for name, module in modules.items():
        for disp, sigs in getattr(module, "SIGNATURES", {}).items():
            for sig in sigs:
                for cc, ptx_bytes, cubin, error in builder.build(disp, sig):
                    done.append(Compiled(name, disp.py_func.__name__, str(sig), cc, ptx_bytes, cubin, error))
    return done, missing


def _main() -> int:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
    done, missing = compile_all()
    for c in done:
        where = f"{c.module}.{c.kernel}{'':<4}{c.signature:<60} sm_{c.cc[0]}{c.cc[1]}"
        if c.error:
            print(f"{where} FAILED: {c.error}")
        else:
            cubin = "device function" if c.cubin_bytes is None else (
                "same PTX as a lower target" if c.cubin_bytes == 0 else f"{c.cubin_bytes} B of cubin")
            print(f"{where} {c.ptx_bytes:>7} B of PTX, {cubin}")
    for m in missing:
        print(f"NOT COMPILED (add it to SIGNATURES): {m}")
    return 1 if missing or any(c.error for c in done) else 0


if __name__ == "__main__":
    sys.exit(_main())
