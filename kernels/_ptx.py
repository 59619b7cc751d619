"""Compile every kernel in ``kernels/`` to PTX for the H200 (sm_90), on any machine.

The CUDA simulator runs kernels as Python and does no type inference, so a kernel can pass every
simulator test and still fail to compile for a GPU. ``cuda.compile_ptx`` runs numba's real CUDA
compiler without a GPU (it needs numba-cuda's toolkit extra, ``numba-cuda[cu13]``). Each kernel
module lists the signatures it is launched with in ``SIGNATURES``; this module compiles them all and
reports any ``@cuda.jit`` function a module forgot to list.

Run ``python -m kernels._ptx`` (with ``NUMBA_ENABLE_CUDASIM=0``: the simulator has no compiler).
"""

import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass
from types import SimpleNamespace

SM90 = (9, 0)


@dataclass(slots=True, frozen=True)
class Compiled:
    module: str
    kernel: str
    signature: str
    ptx_bytes: int


def kernel_modules() -> list[str]:
    import kernels

    return [f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__) if m.name != "_ptx"]


def _dispatchers(module) -> dict[str, object]:
    from numba.cuda.dispatcher import CUDADispatcher

    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, CUDADispatcher) and obj.py_func.__module__ == module.__name__}


def compile_all(cc: tuple[int, int] = SM90) -> tuple[list[Compiled], list[str]]:
    """Compile every listed signature; return what compiled and the names of unlisted kernels."""
    from numba import config

    if config.ENABLE_CUDASIM:
        raise RuntimeError("compile_all needs numba's real CUDA target: run with NUMBA_ENABLE_CUDASIM=0")
    from numba import cuda
    import numba.cuda.dispatcher as dispatcher

    # NOTE: device functions called from a kernel are typed for "the current device"; without a GPU
    # there is none, so we name the target we compile for. The PTX itself comes from compile_ptx(cc=cc).
    if not cuda.is_available():
        dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)

    done, missing = [], []
    for name in kernel_modules():
        module = importlib.import_module(name)
        signatures = getattr(module, "SIGNATURES", {})
        for attr, disp in _dispatchers(module).items():
            if disp not in signatures:
                missing.append(f"{name}.{attr}")
        for disp, sigs in signatures.items():
            device = bool(disp.targetoptions.get("device"))
            fastmath = bool(disp.targetoptions.get("fastmath", False))  # compile the flavour that runs
            for sig in sigs:
                ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=cc, device=device, fastmath=fastmath)
                done.append(Compiled(name, disp.py_func.__name__, sig, len(ptx)))
    return done, missing


def _main() -> int:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")
    done, missing = compile_all()
    for c in done:
        print(f"{c.module}.{c.kernel}{'':<4}{c.signature:<60} {c.ptx_bytes:>7} B of PTX")
    for m in missing:
        print(f"NOT COMPILED (add it to SIGNATURES): {m}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(_main())
