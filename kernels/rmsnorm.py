"""RMSNorm, and residual-add fused with RMSNorm, over the last dimension of a contiguous tensor.

For each row ``x`` of ``width`` values (a token's hidden state, or one head of q or k for QK-norm):

    out = x / sqrt(mean(x**2) + eps) * weight        (fp32 math, rounded once to x's dtype)

``fused_add_rms_norm`` first adds the residual stream, in place, as vLLM does:
``residual <- x + residual`` (rounded to the dtype), ``x <- rms_norm(residual)``; each tensor is read
once and written once, where an add kernel followed by a norm kernel would read ``residual`` twice.

A row is handled by ``group`` threads (a power of two). Each thread sums the squares of its strided
part of the row, then :func:`group_reduce_sum` combines the group: warp shuffles when the group is at
most a warp (several rows per block, no barrier), two levels through shared memory when the group is
the whole block (one row per block). The launcher picks the group from the width: narrow rows such as
a 128-wide head get a fraction of a warp, a 1024-wide hidden state a warp or more.

Kernels: ``rms_norm_kernel`` / ``fused_add_rms_norm_kernel`` load one value at a time and read the
row twice (the second time from cache); kernels._rmsnorm_vec has the 16-byte versions, which read each
value once, used when rows are whole 16-byte chunks (up to 1024 of them) and tensors 16-byte aligned.
Measured on an H100 (bf16, 16,384 tokens, kernel time; 3.0 TB/s copy bandwidth): rms_norm ~2.6 TB/s, fused
~2.7 TB/s, QK-norm ~2.8 TB/s with the 16-byte kernels, within 2-4% of ``torch.compile`` (bench/results/h100/
03_05_kernels.json, 17_norm_variants_cuda.json); ~1 TB/s with the scalar ones.
Limits: contiguous tensors, weight of the same dtype; ``python -m kernels.rmsnorm`` checks and times it.
"""

import functools
import math

import numba
import torch
from numba import cuda

from kernels._checks import FLOAT_DTYPES, check_same, check_tensor
from kernels._launch import cdiv, launch, resolve_backend
from kernels import _rmsnorm_vec
from kernels._reduce import group_reduce_sum
from kernels._vec16 import aligned16
from kernels.basics import WARP

MAX_THREADS = 1024
VEC_MAX_GROUP = 256  # the 16-byte kernels hold ~80-100 registers per thread: blocks of at most 256
SMALL_GROUP_BLOCK = 64  # threads per block when a row's group is at most a warp (several rows per block)
ROW_PER_BLOCK = True  # bf16 rows of ROW_MIN_CHUNKS to 1,024 16-byte chunks (hidden-size rows, not QK-norm's heads):
#   a block per row, a chunk per thread (kernels._rmsnorm_vec.make_row_kernels). Measured on the H100 (CUDA-graph
#   replay, 1,024-wide bf16 rows, RMSNorm, a dev build equal to this one): 1.75 / 1.83 / 2.15 / 4.93 / 24.5 us at
#   1 / 16 / 256 / 4k / 16k tokens against 2.40 / 2.50 / 2.70 / 5.60 / 25.3 for a warp per row (same run);
#   bench.norm_variants compares both with torch.compile
ROW_WARP_ROWS = (2048, 6144)  # (fewest, most) rows: RMSNorm (not the fused add + norm) of that many rows, each of 32
#   to 128 chunks (up to 1,024 bf16), gets a block of ONE warp, 4 chunks a thread, launched without programmatic
#   dependent launch and compiled without its griddepcontrol instructions (kernels._rmsnorm_vec.make_row_kernels,
#   per_thread, pdl=False); None: off. An H100 SM holds 32 blocks and 64 warps: 4,096 one-warp blocks (56 registers
#   a thread) fit at once, where blocks of 4 warps run in two waves. H100, bench.norm_variants at cc446ba
#   (h100/17_norm_variants_cuda_session18.json, graph replay): at 4k tokens 4.64 us against 5.84 for the 4-warp
#   blocks with PDL and 4.76 for torch.compile (a first experiment outside the bench: 4.5-4.6); the same one-warp
#   build with PDL took 5.64 there (its griddepcontrol.wait keeps blocks resident). At 1k and 8k tokens the 4-warp
#   blocks with PDL are faster (2.13 / 11.65 against 2.74 / 12.35), hence the range
ROW_WARP_ROWS_BY_GPU = {"H200": (2048, 2**31 - 1)}  # GPU name (a part of it) -> ROW_WARP_ROWS there. On the H200
#   the one-warp blocks without PDL win at every size from 4k rows up: 8.69 / 19.60 us at 8k / 16k tokens against
#   11.31 / 22.16 for the 4-warp blocks with PDL, where the H100 measured the opposite (11.65 / 24.81 against 12.35 /
#   25.56); torch.compile 8.57 / 19.36 there (bench.norm_variants at ef9f7a1, 17_norm_variants_cuda_session21.json,
#   against h100/17_norm_variants_cuda_session18.json)
HEAD_LAYOUTS = ((16384, (16, 1, 256)), (65536, (4, 4, 64)), (None, (16, 1, 256)))  # RMSNorm of rows of 16 chunks
#   (QK-norm's 128-wide bf16 heads) on a GPU: (most rows, (threads a head, heads a thread, threads a block)) of the
#   head kernels (kernels._rmsnorm_vec.make_head_kernel), the first that takes the row count; () switches them off (the
#   warp kernels, or a block per head up to NARROW_ROW_MAX_ROWS). Measured on the H100 (bench.norm_variants at b6782e2,
#   h100/17_norm_variants_cuda_session23.json, graph replay, 16 heads a token): 16 threads a head 0.97 / 1.03 / 1.36
#   / 2.24 us at 1 / 16 / 256 / 1,024 tokens (the warp kernels 1.82 / 1.90 / 2.51 / 3.37, torch.compile 1.43 / 1.55 /
#   2.01 / 2.95) and 24.6 / 47.9 at 8k / 16k tokens (warp 25.2 / 48.2, compile 25.3 / 49.6); at 4k tokens 4 threads
#   a head of 4 heads each 10.19 (16 threads 11.73, warp 11.13, compile 10.63). Counts between the measured ones
#   (16k-64k heads: 1k-4k tokens) are unmeasured
ROW_MIN_CHUNKS = 32  # the narrowest row (in chunks: 256 bf16) a block of its own is given on a GPU, at any row count
NARROW_ROW_MIN_CHUNKS, NARROW_ROW_MAX_ROWS = 16, 256  # rows of 16-31 chunks (QK-norm's 128-wide heads) get a block
#   each too when there are at most 256 of them (16 tokens of 16 heads), half the block's threads idle. Measured on
#   the H100 (bench.norm_variants, graph replay, PDL): a 32-thread block per head 1.21 / 1.33 / 5.34 / 80 us at
#   1 / 16 / 256 / 4k tokens, against 1.85 / 1.96 / 2.54 / 11.0 for the warp kernels and 1.47 / 2.04 / 3.90 / 10.8
#   for torch.compile (bench/results/h100/17_norm_variants_cuda_session15.json)


# ----------------------------------------------------------------------------- references
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with torch ops: fp32 math over the last dimension, result in x's dtype."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return (xf * rstd * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: (rms_norm(x + residual), x + residual), the sum rounded to the dtype first."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual


# ----------------------------------------------------------------------------- kernels
@cuda.jit
def rms_norm_kernel(x, out, weight, eps, group):
    # x, out: (rows, width); weight: (width,); ``group`` threads per row
    partials = cuda.shared.array(WARP, numba.float32)
    rows, width = x.shape
    per_block = cuda.blockDim.x // group
    lane = cuda.threadIdx.x % group
    first = cuda.blockIdx.x * per_block
    while first < rows:  # the same trip count for every thread of the block (shuffles, barriers)
        row = first + cuda.threadIdx.x // group
        acc = numba.float32(0.0)
        if row < rows:
            for i in range(lane, width, group):  # neighbouring lanes read neighbouring values
                v = numba.float32(x[row, i])
                acc += v * v
        total = group_reduce_sum(acc, group, partials)
        if row < rows:
            inv_rms = numba.float32(1.0) / math.sqrt(total / numba.float32(width) + eps)
            for i in range(lane, width, group):
                out[row, i] = (numba.float32(x[row, i]) * inv_rms) * numba.float32(weight[i])
        first += cuda.gridDim.x * per_block


@cuda.jit
def fused_add_rms_norm_kernel(x, residual, weight, eps, group):
    # x, residual: (rows, width), both updated in place; weight: (width,)
    partials = cuda.shared.array(WARP, numba.float32)
    rows, width = x.shape
    per_block = cuda.blockDim.x // group
    lane = cuda.threadIdx.x % group
    first = cuda.blockIdx.x * per_block
    while first < rows:
        row = first + cuda.threadIdx.x // group
        acc = numba.float32(0.0)
        if row < rows:
            for i in range(lane, width, group):
                residual[row, i] = numba.float32(x[row, i]) + numba.float32(residual[row, i])
                v = numba.float32(residual[row, i])  # read back: the sum rounded to the dtype
                acc += v * v
        total = group_reduce_sum(acc, group, partials)
        if row < rows:
            inv_rms = numba.float32(1.0) / math.sqrt(total / numba.float32(width) + eps)
            for i in range(lane, width, group):
                x[row, i] = (numba.float32(residual[row, i]) * inv_rms) * numba.float32(weight[i])
        first += cuda.gridDim.x * per_block


_TYPES = ("float32", "float16", "bfloat16")
SIGNATURES = {
    group_reduce_sum: ["float32(float32, int64, float32[::1])"],
    rms_norm_kernel: [f"void({t}[:, ::1], {t}[:, ::1], {t}[::1], float32, int64)" for t in _TYPES],
    fused_add_rms_norm_kernel: [f"void({t}[:, ::1], {t}[:, ::1], {t}[::1], float32, int64)" for t in _TYPES],
}


# ----------------------------------------------------------------------------- launchers
def can_vectorize(*tensors: torch.Tensor) -> bool:
    """Whether the 16-byte kernels fit: rows of whole 16-byte chunks, 16-byte aligned, not too wide."""
    row_bytes = tensors[0].shape[-1] * tensors[0].element_size()
    return (row_bytes % 16 == 0 and row_bytes // 16 <= _rmsnorm_vec.MAX_CHUNKS * VEC_MAX_GROUP
            and aligned16(*tensors))


def launch_config(items: int, rows: int, backend: str, max_per_thread: int | None = None) -> tuple[int, int, int]:
    """(threads per row, threads per block, blocks) for rows of ``items`` loads each.

    ``max_per_thread`` is the 16-byte kernels' register budget (chunks per thread); the scalar
    kernel has none and aims at 32 loads per thread. GPU (tuned on the H200): a 1024-wide bf16 row
    (128 chunks) gets a warp, a 128-wide head (16 chunks) 4 threads; groups of a warp or less share
    64-thread blocks, a larger group is the block. Simulator (~0.2 ms per thread, two barriers per
    shuffle): 8 threads per row, at most 4 blocks of 32.
    """
    per_thread = max_per_thread or 32
    if backend == "simulator":
        group, block, max_blocks = min(8, _pow2_at_least(items)), 32, 4
    else:
        group, block, max_blocks = _pow2_at_least(cdiv(items, per_thread)), SMALL_GROUP_BLOCK, 2**31 - 1
    if max_per_thread:
        group = min(max(group, _pow2_at_least(cdiv(items, max_per_thread))), VEC_MAX_GROUP)
    group = min(group, MAX_THREADS)
    block = block if group <= WARP else group  # a group larger than a warp is the whole block
    return group, block, max(1, min(cdiv(rows, block // group), max_blocks))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check(x: torch.Tensor, weight: torch.Tensor, vectorized: bool | None, name: str, other: torch.Tensor) -> bool:
    """Check the arguments (``other`` is out or residual); return whether the 16-byte kernel runs."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., width) with width > 0, got {tuple(x.shape)}")
    check_tensor("weight", weight, dtypes=(x.dtype,), shape=(x.shape[-1],), device=x.device)
    check_tensor(name, other)
    check_same("x", x, name, other)
    fits = can_vectorize(x, weight, other)
    if vectorized and not fits:
        raise ValueError(f"vectorized=True needs rows of whole 16-byte chunks (width {x.shape[-1]} x "
                         f"{x.element_size()} B) and 16-byte aligned tensors")
    return fits if vectorized is None else bool(vectorized)


def _kernel(fused: bool, dtype: torch.dtype, vec: bool):
    if not vec:
        return fused_add_rms_norm_kernel if fused else rms_norm_kernel
    return (_rmsnorm_vec.FUSED_KERNELS if fused else _rmsnorm_vec.NORM_KERNELS)[dtype]


@functools.cache
def _gpu_name(index: int) -> str:
    from kernels._env import gpu_capability

    return gpu_capability(index)[0]


def row_warp_rows(device: torch.device) -> tuple[int, int] | None:
    """The (fewest, most) rows of RMSNorm given a block of one warp on ``device``: ``ROW_WARP_ROWS``, or the range
    ``ROW_WARP_ROWS_BY_GPU`` measured for that GPU; None (off) when ``ROW_WARP_ROWS`` is None."""
    if ROW_WARP_ROWS is None or device.type != "cuda":
        return ROW_WARP_ROWS
    name = _gpu_name(device.index if device.index is not None else torch.cuda.current_device())
    return next((rows for part, rows in ROW_WARP_ROWS_BY_GPU.items() if part in name), ROW_WARP_ROWS)


def head_layout(rows: int) -> tuple[int, int, int] | None:
    """(threads a head, heads a thread, threads a block) of the head kernel ``HEAD_LAYOUTS`` gives ``rows`` heads,
    or None (off)."""
    return next((layout for most, layout in HEAD_LAYOUTS if most is None or rows <= most), None)


def _row_kernel(fused: bool, x: torch.Tensor, vec: bool, where: str, row: bool | None):
    """The block-per-row kernel for this call, or None: ``row`` True/False, or None for the head kernels
    (``HEAD_LAYOUTS``) on RMSNorm of 16-chunk bf16 rows on a GPU, else ``ROW_PER_BLOCK`` on a GPU at rows of
    ``ROW_MIN_CHUNKS`` to 1,024 chunks, or of ``NARROW_ROW_MIN_CHUNKS`` and more when there are at most
    ``NARROW_ROW_MAX_ROWS`` of them (bf16 only; 16-byte chunks, so ``vec`` must hold)."""
    chunks = x.shape[-1] * x.element_size() // 16
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (row is None and not fused and vec and where == "gpu" and x.dtype == torch.bfloat16
            and chunks == _rmsnorm_vec.HEAD_CHUNKS):  # QK-norm's heads: the head kernels (HEAD_LAYOUTS)
        layout = head_layout(rows)
        if layout is not None:
            return _rmsnorm_vec.head_kernel(*layout)
    warp_rows = row_warp_rows(x.device) if not fused and ROW_MIN_CHUNKS <= chunks <= 4 * WARP else None
    if warp_rows and warp_rows[0] <= rows <= warp_rows[1]:
        pair = _rmsnorm_vec.row_kernels(x.dtype, 1, cdiv(chunks, WARP), pdl=False) if vec else None
    else:
        pair = _rmsnorm_vec.row_kernels(x.dtype, cdiv(chunks, WARP)) if vec and 0 < chunks <= MAX_THREADS else None
    if pair is None:
        if row:
            raise ValueError(f"row=True needs bf16 rows of whole 16-byte chunks, at most {MAX_THREADS} of them")
        return None
    if row is None:
        narrow = chunks >= NARROW_ROW_MIN_CHUNKS and rows <= NARROW_ROW_MAX_ROWS
        row = ROW_PER_BLOCK and where == "gpu" and (chunks >= ROW_MIN_CHUNKS or narrow)
    return pair[1 if fused else 0] if row else None


def _run(kernel, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float, vec: bool, where: str,
         max_chunks: int | None = None, max_blocks: int | None = None, row: bool = False) -> None:
    """Launch ``kernel(a, b, weight, eps, group)`` on (rows, width) views, or (rows, chunks) complex128 views;
    ``row``: a block-per-row kernel (:func:`_row_kernel`), ``kernel(a, b, weight, eps)`` on a block per row.

    ``max_chunks``: the 16-byte kernel's chunks per thread (default ``_rmsnorm_vec.MAX_CHUNKS``)."""
    width = weight.numel()
    rows = a.numel() // width
    if rows == 0:
        return
    a, b = a.view(rows, width), b.view(rows, width)
    if vec:
        a, b, weight = a.view(torch.complex128), b.view(torch.complex128), weight.view(torch.complex128)
    if row:  # a block per row (the row's chunks rounded up to whole warps, or one warp), or per group of heads
        launch(kernel, cdiv(rows, kernel.rows_per_block), kernel.row_block, a, b, weight, numba.float32(eps),
               backend=where)
        return
    group, block, blocks = launch_config(a.shape[1], rows, where,
                                        (max_chunks or _rmsnorm_vec.MAX_CHUNKS) if vec else None)
    launch(kernel, min(blocks, max_blocks or blocks), block, a, b, weight, numba.float32(eps), group, backend=where)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, out: torch.Tensor | None = None,
             vectorized: bool | None = None, row: bool | None = None, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of ``x`` (..., width) over its last dimension, times ``weight`` (width,); returns ``out``.

    ``out`` (default: new) may be ``x`` itself. ``vectorized``: None picks the 16-byte kernel when it
    fits (:func:`can_vectorize`), True insists on it, False takes the scalar kernel.
    """
    out = torch.empty_like(x) if out is None and isinstance(x, torch.Tensor) else out
    vec = _check(x, weight, vectorized, "out", out)
    where = resolve_backend(backend, x, weight, out)
    if where == "torch":
        return out.copy_(rms_norm_ref(x, weight, eps))
    kernel = _row_kernel(False, x, vec, where, row)
    _run(kernel or _kernel(False, x.dtype, vec), x, out, weight, eps, vec, where, row=kernel is not None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                       vectorized: bool | None = None, row: bool | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """IN PLACE: ``residual <- x + residual``, ``x <- rms_norm(residual) * weight``; returns (x, residual)."""
    vec = _check(x, weight, vectorized, "residual", residual)
    where = resolve_backend(backend, x, residual, weight)
    if where == "torch":
        out, new_residual = fused_add_rms_norm_ref(x, residual, weight, eps)
        residual.copy_(new_residual)
        return x.copy_(out), residual
    kernel = _row_kernel(True, x, vec, where, row)
    _run(kernel or _kernel(True, x.dtype, vec), x, residual, weight, eps, vec, where, row=kernel is not None)
    return x, residual


def _main() -> None:
    from kernels._timing import graph_time

    on_gpu = torch.cuda.is_available()
    device, t = ("cuda", 4096) if on_gpu else ("cpu", 3)
    shapes = {"hidden": (t, 1024), "qk heads": (t, 16, 128)} if on_gpu else {"hidden": (t, 64), "qk heads": (t, 2, 32)}
    print(f"backend: {resolve_backend('auto', torch.empty(0, device=device))}")
    for dtype in FLOAT_DTYPES:
        for label, shape in shapes.items():
            x, r = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
            w = torch.randn(shape[-1], device=device, dtype=dtype)
            want, (want_x, want_r) = rms_norm_ref(x, w, 1e-6), fused_add_rms_norm_ref(x, r, w, 1e-6)
            for vec in (False, True):
                got = (rms_norm(x, w, vectorized=vec), *fused_add_rms_norm(x.clone(), r.clone(), w, vectorized=vec))
                err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, (want, want_x, want_r)))
                line = f"{str(dtype)[6:]:9s} {label:9s} {shape!s:16s} {'16 B' if vec else 'scalar':6s} |err| {err:.1e}"
                if on_gpu:
                    us = graph_time(lambda: rms_norm(x, w, vectorized=vec)).median_us
                    line += f"  rms_norm {us:6.1f} us {2 * x.nbytes / us / 1e3:5.0f} GB/s"
                print(line)


if __name__ == "__main__":
    _main()
