"""Phase 01's kernels: the first things every CUDA programmer writes, used by the course and the benchmarks.

* ``copy`` -- a grid-stride copy. With ``vector_bytes=16`` each thread moves 16 bytes per load and
  store (the tensors are viewed as complex128), which is what gets a copy close to HBM speed.
* ``add`` -- one thread per element, the bounds check that every kernel needs.
* ``block_sum`` -- a reduction through shared memory: a tree of halving strides, one barrier each.
* ``warp_sum`` -- the same reduction with warp shuffles: registers instead of shared memory, two
  barriers instead of log2(threads).

Limits: 1-D contiguous tensors; sums accumulate in float32 and are combined across blocks with
``atomic.add``, so their last bits depend on block order. Run ``python -m kernels.basics`` to check
every kernel against PyTorch on the current backend and time it.
"""

import numba
import torch
from numba import cuda

from kernels._checks import FLOAT_DTYPES, check_same, check_tensor
from kernels._launch import cdiv, launch, resolve_backend

MAX_THREADS = 1024  # largest block a CUDA GPU runs; sizes the shared-memory scratch arrays
WARP = 32
FULL_MASK = 0xFFFFFFFF


# ----------------------------------------------------------------------------- kernels
@cuda.jit
def copy_kernel(src, dst):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < dst.size:  # grid-stride loop: any grid covers any size
        dst[i] = src[i]
        i += stride


@cuda.jit
def add_kernel(x, y, out):
    i = cuda.grid(1)
    if i < out.size:  # the last block may run past the end
        out[i] = x[i] + y[i]


@cuda.jit
def block_sum_kernel(x, out):
    scratch = cuda.shared.array(MAX_THREADS, numba.float32)
    tid = cuda.threadIdx.x
    acc = numba.float32(0.0)
    i = cuda.grid(1)
    while i < x.size:
        acc += numba.float32(x[i])
        i += cuda.gridsize(1)
    scratch[tid] = acc
    cuda.syncthreads()
    half = cuda.blockDim.x // 2  # blockDim.x is a power of two (the launcher checks)
    while half > 0:
        if tid < half:
            scratch[tid] += scratch[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        cuda.atomic.add(out, 0, scratch[0])


@cuda.jit(device=True)
def warp_reduce_sum(value):
    """Sum ``value`` over the 32 lanes of a warp; every lane gets the total."""
    offset = WARP // 2
    while offset > 0:
        value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
        offset //= 2
    return value


@cuda.jit
def warp_sum_kernel(x, out):
    partials = cuda.shared.array(WARP, numba.float32)  # one slot per warp of the block
    tid = cuda.threadIdx.x
    lane = tid % WARP
    warp = tid // WARP
    acc = numba.float32(0.0)
    i = cuda.grid(1)
    while i < x.size:
        acc += numba.float32(x[i])
        i += cuda.gridsize(1)
    acc = warp_reduce_sum(acc)
    if lane == 0:
        partials[warp] = acc
    cuda.syncthreads()
    # NOTE: every warp runs the second round (on zeros past the last warp), so every thread makes
    # the same shuffle calls -- required by the simulator's shuffles, harmless on the GPU.
    n_warps = (cuda.blockDim.x + WARP - 1) // WARP
    acc = partials[lane] if lane < n_warps else numba.float32(0.0)
    acc = warp_reduce_sum(acc)
    if tid == 0:
        cuda.atomic.add(out, 0, acc)


SIGNATURES = {
    copy_kernel: [
        "void(float32[::1], float32[::1])",
        "void(float16[::1], float16[::1])",
        "void(complex128[::1], complex128[::1])",
    ],
    add_kernel: ["void(float32[::1], float32[::1], float32[::1])", "void(float16[::1], float16[::1], float16[::1])"],
    block_sum_kernel: ["void(float32[::1], float32[::1])", "void(float16[::1], float32[::1])"],
    warp_reduce_sum: ["float32(float32)"],
    warp_sum_kernel: ["void(float32[::1], float32[::1])", "void(float16[::1], float32[::1])"],
}


# ----------------------------------------------------------------------------- references
def copy_ref(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return dst.copy_(src)


def add_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def sum_ref(x: torch.Tensor) -> torch.Tensor:
    return x.float().sum().reshape(1)


# ----------------------------------------------------------------------------- launchers
def _grid_for(n: int, threads: int, blocks: int | None, backend: str, gpu_cap: int = 2**31 - 1) -> int:
    if blocks is not None:
        return blocks
    # A simulated thread costs ~0.2 ms: cap the simulator's grid and let the grid-stride loop work.
    # On the GPU a copy wants one thread per element (the most loads in flight); a sum wants a few
    # blocks per SM (every block ends in one atomic add), which ``gpu_cap`` sets.
    cap = 4 if backend == "simulator" else gpu_cap
    return max(1, min(cdiv(n, threads), cap))


def _check_threads(threads: int) -> None:
    if not (WARP <= threads <= MAX_THREADS and threads & (threads - 1) == 0):
        raise ValueError(f"threads must be a power of two in [{WARP}, {MAX_THREADS}], got {threads}")


def copy(src: torch.Tensor, dst: torch.Tensor, *, threads: int = 256, blocks: int | None = None,
         vector_bytes: int = 4, backend: str = "auto") -> torch.Tensor:
    """Copy ``src`` into ``dst`` (1-D, same shape and dtype). ``vector_bytes=16`` moves 16 B per thread step."""
    check_tensor("src", src, ndim=1)
    check_tensor("dst", dst, ndim=1)
    check_same("src", src, "dst", dst)
    where = resolve_backend(backend, src, dst)
    if where == "torch":
        return copy_ref(src, dst)
    out = dst
    if vector_bytes == 16 and (src.numel() * src.element_size()) % 16 == 0 \
            and src.data_ptr() % 16 == 0 and dst.data_ptr() % 16 == 0:
        src, dst = src.view(torch.complex128), dst.view(torch.complex128)
    elif vector_bytes not in (4, 16):
        raise ValueError(f"vector_bytes must be 4 or 16, got {vector_bytes}")
    launch(copy_kernel, _grid_for(dst.numel(), threads, blocks, where), threads, src, dst, backend=where)
    return out


def add(x: torch.Tensor, y: torch.Tensor, *, threads: int = 256, backend: str = "auto") -> torch.Tensor:
    """``x + y`` for 1-D tensors, one thread per element."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=1)
    check_tensor("y", y, dtypes=FLOAT_DTYPES, ndim=1)
    check_same("x", x, "y", y)
    where = resolve_backend(backend, x, y)
    if where == "torch":
        return add_ref(x, y)
    out = torch.empty_like(x)
    launch(add_kernel, cdiv(x.numel(), threads), threads, x, y, out, backend=where)
    return out


def _sum(kernel, x: torch.Tensor, threads: int, blocks: int | None, backend: str) -> torch.Tensor:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=1)
    _check_threads(threads)
    where = resolve_backend(backend, x)
    if where == "torch":
        return sum_ref(x)
    out = torch.zeros(1, dtype=torch.float32, device=x.device)
    launch(kernel, _grid_for(x.numel(), threads, blocks, where, gpu_cap=132 * 8), threads, x, out, backend=where)
    return out


def block_sum(x: torch.Tensor, *, threads: int = 256, blocks: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Sum of a 1-D tensor (float32 result of shape (1,)) with a shared-memory tree per block."""
    return _sum(block_sum_kernel, x, threads, blocks, backend)


def warp_sum(x: torch.Tensor, *, threads: int = 256, blocks: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Sum of a 1-D tensor (float32 result of shape (1,)) with warp shuffles."""
    return _sum(warp_sum_kernel, x, threads, blocks, backend)


def _main() -> None:
    from kernels._timing import bench

    on_gpu = torch.cuda.is_available()
    device, n = ("cuda", 1 << 26) if on_gpu else ("cpu", 1000)
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    dst = torch.empty_like(x)
    checks = {
        "copy": (lambda: copy(x, dst), lambda: x, 0.0),
        "copy 16B": (lambda: copy(x, dst, vector_bytes=16), lambda: x, 0.0),
        "add": (lambda: add(x, y), lambda: add_ref(x, y), 0.0),
        "block_sum": (lambda: block_sum(x, threads=64), lambda: sum_ref(x), 1e-3 * n ** 0.5),
        "warp_sum": (lambda: warp_sum(x, threads=64), lambda: sum_ref(x), 1e-3 * n ** 0.5),
    }
    print(f"backend: {resolve_backend('auto', x)}, n = {n:,}")
    for name, (fn, ref, tol) in checks.items():
        err = (fn().float() - ref().float()).abs().max().item()
        status = "ok" if err <= tol else "FAIL"
        line = f"{name:10s} max |err| {err:.2e}  {status}"
        if on_gpu:
            line += f"  {bench(fn).median_us:8.1f} us"
        print(line)


if __name__ == "__main__":
    _main()
