"""Every kernel in kernels/ compiles to PTX for the H200 (sm_90) -- on this CPU-only machine.

The simulator does no type inference, so this is what catches a kernel that would not compile on
the GPU. It runs in a subprocess because numba's real CUDA target cannot be loaded in a process
whose numba is the simulator.
"""

import os
import subprocess
import sys

import kernels._ptx as ptx


def test_every_kernel_compiles_for_sm90():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, "-m", "kernels._ptx"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = [line for line in proc.stdout.splitlines() if line.endswith("B of PTX")]
    modules = {line.split(".")[1] for line in compiled}
    assert {"basics", "_vec16"} <= modules, proc.stdout
    assert len(compiled) >= 10, proc.stdout


def test_every_kernel_module_is_discovered():
    assert "kernels.basics" in ptx.kernel_modules()
