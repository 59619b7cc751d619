"""What the notebook runs on: a GPU, or numba's CUDA simulator on the CPU."""

import platform
import sys
from dataclasses import dataclass
from importlib import metadata


@dataclass(slots=True, frozen=True)
class Environment:
    backend: str  # "gpu" or "simulator"
    device: str  # GPU name, or the CPU's description
    versions: dict[str, str]

    @property
    def on_gpu(self) -> bool:
        return self.backend == "gpu"

    def __str__(self) -> str:
        where = f"GPU: {self.device}" if self.on_gpu else f"no GPU: numba's CUDA simulator on {self.device}"
        pkgs = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        return f"{where}\n{pkgs}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def setup(quiet: bool = False) -> Environment:
    """Choose the kernel backend (before numba is imported) and describe the environment."""
    import kernels  # noqa: F401  -- sets NUMBA_ENABLE_CUDASIM when there is no GPU
    from kernels._env import simulator_enabled

    import torch

    if simulator_enabled():
        threads = torch.get_num_threads()
        backend, device = "simulator", f"{platform.machine()} CPU ({threads} thread{'s' if threads > 1 else ''})"
    else:
        backend, device = "gpu", torch.cuda.get_device_name()
    versions = {"python": sys.version.split()[0]}
    versions |= {d: _version(d) for d in ("torch", "numba", "numba-cuda", "numpy")}
    env = Environment(backend, device, versions)
    if not quiet:
        print(env)
    return env
