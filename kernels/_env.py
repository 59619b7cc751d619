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
