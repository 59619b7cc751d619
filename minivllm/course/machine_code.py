"""A kernel's machine code, read on any machine: what ptxas gives a numba kernel for a GPU, without the GPU.

``machine_code(kernel, signature)`` compiles a ``@cuda.jit`` kernel -- yours from a notebook, or the package's --
for one GPU target with numba's real CUDA compiler and NVIDIA's assembler (through ``kernels._ptx``), then reads
back registers per thread, local memory ("stack") and spilled bytes, and (with ``nvdisasm``, in the test extra)
counts the SASS instructions that matter for speed: global loads by width, shared and local memory accesses,
FMAs, tensor-core multiplies. It runs in a subprocess because a process whose numba is the CUDA simulator (every
notebook on a machine without a GPU) cannot load the real compiler.

A notebook's kernel is sent as its source, with the plain constants it reads (``ROWS``, ``TILE_N``...: pass
``constants`` to compile it with the GPU's values) and the modules ``math``, ``numba``, ``cuda`` and ``np``; a
kernel that calls other device functions of a notebook is not supported (the package's kernels are imported by
module instead). ~10 s on 2 cores.
"""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent('''
    import importlib, json, math, sys
    import numba
    import numpy as np
    from numba import cuda
    import kernels._ptx as ptx

    job = json.loads(sys.stdin.read())
    cc = tuple(job["cc"])
    ptx._pretend_device(cc)
    if job["module"] is not None:  # a kernel of an importable module: the package's
        kernel = getattr(importlib.import_module(job["module"]), job["name"])
    else:  # a notebook's: its source, with the constants it reads
        namespace = {"math": math, "numba": numba, "cuda": cuda, "np": np, **job["constants"]}
        exec(job["source"], namespace)
        kernel = namespace[job["name"]]
    builder = ptx._Builder((cc,), cc)
    record = builder.add_census(builder.compile("notebook", kernel, job["signature"]))[0]
    if record.error:
        print(json.dumps({"error": record.error}))
    else:
        r = record.resources
        print(json.dumps({"registers": r.registers, "warps_per_sm": ptx.warps_per_sm(r.registers),
                          "stack_bytes": r.stack_bytes, "spill_store_bytes": r.spill_store_bytes,
                          "spill_load_bytes": r.spill_load_bytes, "smem_bytes": r.smem_bytes, "sass": r.sass,
                          "instructions": r.instructions}))
''')


class ToolchainMissing(RuntimeError):
    """numba's real CUDA compiler needs the CUDA toolkit wheels (``numba-cuda[cu13]``: NVVM, NVRTC, nvJitLink)."""


def _job(kernel, signature: str, constants: dict | None, cc: tuple[int, int]) -> dict:
    func = kernel.py_func
    job = {"name": func.__name__, "signature": signature, "cc": list(cc), "module": None, "source": None,
           "constants": {}}
    module = sys.modules.get(func.__module__)
    if func.__module__.startswith(("kernels.", "minivllm.")) and getattr(module, func.__name__, None) is kernel:
        job["module"] = func.__module__  # the package's: the subprocess imports it
        return job
    source = textwrap.dedent(inspect.getsource(func))
    names = set(func.__code__.co_names)
    plain = (int, float, bool, str)
    job["constants"] = {n: v for n, v in func.__globals__.items() if n in names and isinstance(v, plain)}
    job["constants"].update(constants or {})
    called = [n for n in names if isinstance(func.__globals__.get(n), types.FunctionType)
              or type(func.__globals__.get(n)).__name__ in ("CUDADispatcher", "FakeCUDAKernel")]
    if called:
        raise ValueError(f"{func.__name__} calls {', '.join(sorted(called))}: machine_code compiles a notebook "
                         "kernel alone, with plain constants and math / numba / cuda / np")
    job["source"] = source
    return job


def machine_code(kernel, signature: str, *, constants: dict | None = None, cc: tuple[int, int] = (9, 0)) -> dict:
    """Compile ``kernel`` (a ``@cuda.jit`` function) at ``signature`` for ``sm_XY`` (default sm_90, Hopper) and
    return what ptxas and nvdisasm say of it: ``registers``, ``warps_per_sm``, ``stack_bytes``,
    ``spill_store_bytes``, ``smem_bytes``, ``sass`` (opcode -> count; None without nvdisasm), ``instructions``.
    ``constants`` overrides the notebook constants the kernel reads (e.g. the GPU's tile sizes)."""
    if importlib.util.find_spec("cuda.bindings") is None:
        raise ToolchainMissing("machine_code needs the CUDA toolkit wheels: pip install 'numba-cuda[cu13]' "
                               "(make lab installs them)")
    job = _job(kernel, signature, constants, cc)
    # NOTE: the report needs no GPU, so the subprocess sees none: a GPU machine takes the same path as a laptop
    # (the target named by ``cc``, not the device's) instead of one that only GPU machines would exercise
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(job), env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {job['name']} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in report:
        raise RuntimeError(f"{job['name']} does not compile for sm_{cc[0]}{cc[1]}: {report['error'][:3000]}")
    return report


def count(report: dict, family: str, modifier: str | None = None) -> int | None:
    """SASS instructions of one opcode family (``"LDG"``), only those with ``modifier`` (``"128"``) if given;
    None when the report has no census (nvdisasm not installed)."""
    if report["sass"] is None:
        return None
    return sum(n for op, n in report["sass"].items()
               if op.split(".")[0] == family and (modifier is None or modifier in op.split(".")[1:]))
