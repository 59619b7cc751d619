"""One place that decides where a kernel call runs, and launches it there.

A launcher in ``kernels/*.py`` asks :func:`resolve_backend` where to go:

==============  ==================================================================================
``"gpu"``       CUDA tensors: the numba kernel on the GPU, on torch's current stream (so a
                ``torch.cuda.CUDAGraph`` capture records it).
``"simulator"`` CPU tensors while numba's CUDA simulator is on (tests, notebooks without a GPU):
                the same kernel source, run thread by thread in Python. Slow: keep shapes tiny.
``"torch"``     the PyTorch reference: CPU tensors without the simulator, or on request.
==============  ==================================================================================

:func:`launch` then converts torch tensors to numba arrays without copying and starts the kernel.
On the GPU the conversions and launch configurations are cached: numba wrapping a raw tensor costs
~80 µs per launch, a cached view lookup < 1 µs; a whole ``launch`` costs ~8 µs more than calling a
pre-configured kernel on pre-wrapped arrays (~30 µs), measured on the H200 (bench/results/01_basics.json).
Inside a captured CUDA graph none of this host cost remains (~1 µs per kernel replayed).

Kernels marked by :func:`kernels._pdl.mark` are launched with programmatic dependent launch allowed on GPUs that
have it (sm_90 and newer; ``PDL``): the GPU may start them while the kernel before them finishes (see
:mod:`kernels._pdl`). numba-cuda 0.30 launches through ``cuda.core`` with a fixed launch configuration, so for
those kernels the compiled kernel's ``launch`` is replaced, at its first launch here, by one that adds the PDL
attribute (numba's own steps otherwise: the same argument packing, the same ``cuda.core.launch``).
"""

import types
import warnings
from collections import OrderedDict
from typing import Literal

import torch

from kernels._env import simulator_enabled

Backend = Literal["gpu", "simulator", "torch"]
BACKEND_CHOICES = ("auto", "numba", "torch")

_VIEW_CACHE_SIZE = 1024
_views: OrderedDict = OrderedDict()
_streams: dict[int, object] = {}
_configs: dict[tuple, object] = {}
PDL = True  # launch kernels marked by kernels._pdl.mark with programmatic dependent launch on sm_90 and newer
_pdl_devices: dict[int, bool] = {}
_pdl_configs: dict[tuple, object] = {}
_pdl_broken: list[str] = []  # why PDL launches were given up (an older cuda.core without the attribute)


def resolve_backend(backend: str = "auto", *tensors: torch.Tensor) -> Backend:
    """Where a call on ``tensors`` runs. ``backend`` is ``"auto"``, ``"numba"`` or ``"torch"``.

    ``"numba"`` insists on the numba kernel (GPU or simulator) and raises if neither can run it.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        if simulator_enabled():
            raise RuntimeError("CUDA tensors were passed while numba's CUDA simulator is on")
        return "gpu"
    if device.type != "cpu":
        raise ValueError(f"unsupported device {device}: kernels take CUDA or CPU tensors")
    if simulator_enabled():
        return "simulator"
    if backend == "numba":
        raise RuntimeError(
            "numba kernels on CPU tensors need the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 "
            "before numba is imported (importing `kernels` first does this when no GPU is present)"
        )
    return "torch"


def host_array(t: torch.Tensor):
    """A numpy view of a CPU tensor (no copy), as the simulator wants it. bf16 via ml_dtypes."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def device_array(t: torch.Tensor):
    """A numba device-array view of a CUDA tensor (no copy), cached by pointer, shape, stride, dtype.

    The view does not keep the tensor alive (``owner=None``): an entry can only be found again
    through a live tensor with the same pointer and layout, which is then the same memory.
    """
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.get_device())
    view = _views.get(key)
    if view is None:
        from numba import cuda

        if t.dtype == torch.bfloat16:  # numba reads torch's "<V2" typestr as raw bytes: retype it
            import ml_dtypes

            raw = t.view(torch.int16).__cuda_array_interface__
            view = cuda.from_cuda_array_interface(raw, owner=None, sync=False).view(ml_dtypes.bfloat16)
        else:
            view = cuda.from_cuda_array_interface(t.__cuda_array_interface__, owner=None, sync=False)
        _views[key] = view
        if len(_views) > _VIEW_CACHE_SIZE:
            _views.popitem(last=False)
    return view


def _raw_stream(device: int) -> int:
    # torch's own fast path (used by Triton's launcher too): no Python Stream object per call
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return getter(device) if getter else torch.cuda.current_stream(device).cuda_stream


def current_stream() -> tuple[int, object]:
    """torch's current CUDA stream: its handle, and the numba stream wrapping it (cached by handle)."""
    handle = _raw_stream(torch.cuda.current_device())
    stream = _streams.get(handle)
    if stream is None:
        from numba import cuda

        stream = _streams[handle] = cuda.external_stream(handle)
    return handle, stream


def launch(kernel, grid, block, *args, backend: Backend, shared_mem: int = 0) -> None:
    """Launch ``kernel[grid, block]`` on ``args``; torch tensors are converted for the backend."""
    grid = grid if isinstance(grid, tuple) else (int(grid),)
    block = block if isinstance(block, tuple) else (int(block),)
    if backend == "gpu":
        handle, stream = current_stream()
        key = (kernel, grid, block, handle, shared_mem)
        configured = _configs.get(key)
        if configured is None:
            configured = _configs[key] = kernel[grid, block, stream, shared_mem]
            if getattr(kernel, "pdl", False):
                configured.pre_launch_callbacks.append(_allow_pdl)
        configured(*[device_array(a) if isinstance(a, torch.Tensor) else a for a in args])
    elif backend == "simulator":
        from kernels import _simulator

        _simulator.install()  # shuffles, and a block barrier that does not poll
        kernel[grid, block, 0, shared_mem](*[host_array(a) if isinstance(a, torch.Tensor) else a for a in args])
    else:
        raise ValueError(f"launch() runs numba kernels; backend {backend!r} has no kernel to launch")


def pdl_active() -> bool:
    """Whether marked kernels launch with PDL on the current device: ``PDL`` on and the GPU sm_90 or newer."""
    if not PDL or _pdl_broken:
        return False
    index = torch.cuda.current_device()
    ok = _pdl_devices.get(index)
    if ok is None:
        from kernels._pdl import PDL_MIN_CC

        ok = _pdl_devices[index] = torch.cuda.get_device_capability(index) >= PDL_MIN_CC
    return ok


def _allow_pdl(compiled, launch_config) -> None:
    # numba's pre-launch hook, with the compiled kernel numba chose for these arguments: give that kernel (once)
    # a launch that allows PDL
    if "launch" not in compiled.__dict__:
        compiled.launch = types.MethodType(_launch_pdl, compiled)


def _launch_pdl(self, args, griddim, blockdim, stream=0, sharedmem=0):
    """numba-cuda 0.30's ``_Kernel.launch`` (no debug mode) with ``programmatic_stream_serialization`` set."""
    if self.debug or not pdl_active():
        return type(self).launch(self, args, griddim, blockdim, stream, sharedmem)
    from numba.cuda.dispatcher import LaunchConfig, launch as core_launch

    key = (griddim, blockdim, sharedmem)
    config = _pdl_configs.get(key)
    if config is None:
        try:
            config = LaunchConfig(grid=griddim, block=blockdim, shmem_size=sharedmem,
                                  programmatic_stream_serialization=True)
        except TypeError as e:  # a cuda.core without PDL: launch as numba does, from now on
            _pdl_broken.append(str(e))
            warnings.warn(f"programmatic dependent launch unavailable ({e}); kernels launch without it",
                          RuntimeWarning, stacklevel=2)
            return type(self).launch(self, args, griddim, blockdim, stream, sharedmem)
        _pdl_configs[key] = config
    kernelargs, retr = [], []
    for t, v in zip(self.argument_types, args):
        self._prepare_args(t, v, stream, retr, kernelargs)
    core_launch(stream, config, self._codelibrary.get_cufunc().kernel, *kernelargs)
    for writeback in retr:
        writeback()


_resident: dict[tuple, int] = {}


def resident_blocks(kernel, threads: int, device: torch.device) -> int:
    """How many blocks of ``threads`` threads of ``kernel`` (a numba dispatcher) a GPU runs at once: blocks per
    SM (the driver's occupancy calculator: registers, shared memory, block size) x SMs. A grid of more blocks
    runs in waves; a last wave that is partly empty leaves SMs idle. Before the kernel's first launch (nothing
    compiled yet to ask about) the answer is a guess, 4 per SM, and is not kept."""
    key = (kernel, threads, device.index)
    if key in _resident:
        return _resident[key]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    compiled = list(getattr(kernel, "overloads", {}).values())
    if not compiled:
        return 4 * sms
    try:
        blocks = int(compiled[0].max_cooperative_grid_blocks(threads))
    except Exception:  # noqa: BLE001 - an occupancy query is advice: a driver without it gets the guess
        blocks = 0
    _resident[key] = blocks if blocks > 0 else 4 * sms
    return _resident[key]


def cdiv(a: int, b: int) -> int:
    """Ceiling division: how many blocks of ``b`` cover ``a``."""
    return -(-a // b)
