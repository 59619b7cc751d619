"""Decide, before numba is imported, whether kernels run on a GPU or in numba's CUDA simulator.

numba reads ``NUMBA_ENABLE_CUDASIM`` once, when ``numba`` is first imported. So the choice must be
made early: ``import kernels`` (and the tests' ``conftest.py``) call :func:`configure_numba`, which
turns the simulator on when no CUDA GPU is visible and nobody has said otherwise.
"""

import os
import sys
import warnings


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_numba() -> bool:
    """Turn on the CUDA simulator when there is no GPU. Returns whether the simulator is on.

    An explicit ``NUMBA_ENABLE_CUDASIM`` in the environment always wins.
    """
    os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
    if "NUMBA_ENABLE_CUDASIM" not in os.environ:
        want = "0" if gpu_available() else "1"
        if "numba" in sys.modules and want == "1":
            from numba import config

            if not config.ENABLE_CUDASIM:
                warnings.warn(
                    "numba was imported before `kernels` and no GPU is present: numba kernels "
                    "cannot run (the CUDA simulator must be chosen before numba is imported). "
                    "Import `kernels` first, or set NUMBA_ENABLE_CUDASIM=1.",
                    stacklevel=3,
                )
            return bool(config.ENABLE_CUDASIM)
        os.environ["NUMBA_ENABLE_CUDASIM"] = want
    return os.environ["NUMBA_ENABLE_CUDASIM"] == "1"


def simulator_enabled() -> bool:
    """Whether ``numba.cuda`` is (or will be, once imported) the CUDA simulator."""
    if "numba" in sys.modules:
        from numba import config

        return bool(config.ENABLE_CUDASIM)
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


MIN_COMPUTE_CAPABILITY = (8, 0)  # bf16 (tensor cores, conversions, torch's bf16 matmuls): Ampere and later


def gpu_capability(index: int = 0) -> tuple[str, tuple[int, int]]:
    """The name and compute capability of CUDA device ``index`` (``torch.cuda``; tests monkeypatch this)."""
    import torch

    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


def check_gpu_supported(index: int = 0) -> None:
    """Raise one clear error, at start-up, for a GPU older than Ampere (compute capability < 8.0).

    The GPU path runs bf16 weights and activations and has been checked for sm_80-sm_90 only (kernels
    compiled for those targets in CI, run on an H200). A T4 (7.5) or V100 (7.0) lacks native bf16, and we do
    not offer an fp16 path instead: Qwen3's activations overflow fp16's range, and nothing here has run on
    such a GPU. The CPU path works on any machine.
    """
    name, cc = gpu_capability(index)
    if cc < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(
            f"GPU {index} ({name}) has compute capability {cc[0]}.{cc[1]}; minivllm's GPU path needs bf16, which "
            f"needs compute capability {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer (A100, "
            f"RTX 30xx/40xx, L4, H100/H200). Run on the CPU instead: device='cpu' (minivllm serve --device cpu).")
