"""RMSNorm's 16-byte kernels: each thread moves 16 bytes per load and store, and reads every value once.

The rows are viewed as ``complex128`` (one 16-byte chunk = 8 bf16/fp16 or 4 fp32 values) and split
into four 32-bit words. A thread keeps the words of its chunks in registers (a local array indexed by
constants once the loops unroll), so the row is read from memory once:

    loads:  the thread's chunks j = lane, lane + group, ... of the row, and the weight's same chunks, ALL
            issued before any is used, so their memory latencies overlap instead of adding up
    pass 1: unpack to fp32, sum of squares; the ``group`` threads of the row add their sums
            (kernels._reduce.group_reduce_sum)
    pass 2: unpack the row again, scale by 1/rms and the weight, pack, store 16 bytes

Packing rounds two fp32 values to bf16 in one instruction (``cvt.rn.bf16x2.f32``; round to nearest even, as the
integer arithmetic of :func:`pack_bf16x8` does), and a thread finds its row and lane by a shift and a mask, not an
int64 ``//`` and ``%`` (``group`` is a power of two; kernels._index). Measured on an H100 (bf16, CUDA-graph replay,
``python -m bench.norm_variants``, bench/results/h100/17_norm_variants_cuda.json), against the earlier build
(integer rounding, the weight loaded after the reduction, divisions): 1 token 2.3 / 2.5 / 2.2 µs against 2.7 / 3.6
/ 2.8 (RMSNorm / fused / QK-norm); 16k tokens 26.1 / 50.4 / 48.8 against 28.9 / 53.0 / 51.5 µs, where
``torch.compile`` of the reference took 25.5 / 48.2 / 47.9. Up to 4 chunks per thread (~94 registers) beat 8
(~170, H200), and 2 at 4k tokens (2 won by 0.1-0.2 µs at 1-256 tokens and was within 1% at 16k); blocks of 128 or
256 threads, and a grid of resident blocks that loads the next row while it normalizes one
(``make_kernels(stream=True)``), did not beat 64-thread blocks overall.

The 16-byte loads and stores are kernels._vec16's ``load_words`` / ``store_words``: one ``ld.global.v4.u32``
/ ``st.global.v4.u32`` instruction each on the GPU.

Limits: a row must be whole chunks (width * element size % 16 == 0), every tensor 16-byte aligned,
and at most ``MAX_CHUNKS`` chunks per thread in groups of at most 256 threads (rmsnorm.VEC_MAX_GROUP):
rows up to 1024 chunks (8,192 bf16 values). The launcher in kernels.rmsnorm checks this and takes
the scalar kernels otherwise.
"""

import functools
import math

import numba
import numpy as np
import torch
from numba import cuda

from kernels._vec16 import bf16_hi, bf16_lo, f32, f32_word, load_words, pack_bf16, store_words
from kernels._reduce import group_reduce_sum
from kernels._pdl import mark, pdl_trigger, pdl_wait
from kernels._index import div_pow2, mod_pow2, pow2_shift
from kernels._mma import pack_bf16 as mma_pack_bf16
from kernels.basics import WARP, warp_reduce_sum

MAX_CHUNKS = 4  # 16-byte chunks per thread, kept in registers as 16 words. Fewer (1 or 2: more threads per row,
#   56-76 registers, the weight loaded with the row) measured slower on the H100 at 4k and 16k tokens, up to 1.5x
#   for QK-norm at 1 chunk (bench/results/h100/03_rmsnorm_chunks.json)


# ----------------------------------------------------------------------------- words <-> fp32 values
@cuda.jit(device=True, inline=True)
def unpack_bf16(w, at, vals):
    """The 8 bf16 in words ``w[at:at + 4]`` as fp32, into ``vals[0:8]``."""
    for i in range(4):
        vals[2 * i], vals[2 * i + 1] = bf16_lo(w[at + i]), bf16_hi(w[at + i])


@cuda.jit(device=True, inline=True)
def pack_bf16x8(vals, w, at):
    """``vals[0:8]`` rounded to bf16 (to nearest even), into words ``w[at:at + 4]``."""
    for i in range(4):
        w[at + i] = pack_bf16(vals[2 * i], vals[2 * i + 1])


@cuda.jit(device=True, inline=True)
def unpack_f16(w, at, vals):
    """The 8 fp16 in ``w[at:at + 4]`` as fp32: a local array reinterprets the bits (in registers)."""
    words = cuda.local.array(4, numba.int32)
    for i in range(4):
        words[i] = w[at + i]
    halves = words.view(np.float16)
    for i in range(8):
        vals[i] = numba.float32(halves[i])


@cuda.jit(device=True, inline=True)
def pack_f16x8(vals, w, at):
    words = cuda.local.array(4, numba.int32)
    halves = words.view(np.float16)
    for i in range(8):
        halves[i] = vals[i]  # rounded to nearest fp16
    for i in range(4):
        w[at + i] = words[i]


@cuda.jit(device=True, inline=True)
def unpack_f32(w, at, vals):
    for i in range(4):
        vals[i] = f32(w[at + i])


@cuda.jit(device=True, inline=True)
def pack_f32x4(vals, w, at):
    for i in range(4):
        w[at + i] = f32_word(vals[i])


# ----------------------------------------------------------------------------- kernels
@cuda.jit(device=True, inline=True)
def pack_bf16x8_cvt(vals, w, at):
    """:func:`pack_bf16x8` in four instructions: the GPU's ``cvt.rn.bf16x2.f32`` rounds two values at once."""
    for i in range(4):
        w[at + i] = numba.int32(mma_pack_bf16(vals[2 * i], vals[2 * i + 1]))


def make_kernels(unpack, pack, per_chunk: int, name: str, max_chunks: int = MAX_CHUNKS, weight_early: bool = True,
                 divide: bool = False, stream: bool = False):
    """The RMSNorm and fused add+RMSNorm kernels for one dtype (``per_chunk`` values in 16 bytes).

    ``weight_early``: load the weight's chunks with the row's, before the reduction (one memory round trip
    fewer per row, ``4 * max_chunks`` more registers held across it). ``divide``: find a thread's row and lane
    by int64 ``//`` and ``%`` (the earlier build, kept for ``bench.norm_variants``) instead of a shift and a mask
    (``group`` is a power of two; kernels._index). ``stream``: (the RMSNorm kernel for a grid of resident blocks
    that loads the next row while it normalizes one, None) -- a build ``bench.norm_variants`` times."""
    n_words = 4 * max_chunks

    @cuda.jit(device=True, inline=True)
    def load_row(src, valid, lane, group, w):
        """The words of this thread's chunks of the row ``src`` (1-D) into ``w``: loads only, no use."""
        for k in range(max_chunks):  # unrolled: ``w`` is indexed by constants and stays in registers
            j = lane + k * group
            if valid and j < src.size:
                w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3] = load_words(src, j)

    @cuda.jit(device=True, inline=True)
    def sum_squares(w, vals, chunks, lane, group):
        acc = numba.float32(0.0)
        for k in range(max_chunks):
            if lane + k * group < chunks:
                unpack(w, 4 * k, vals)
                for i in range(per_chunk):
                    acc += vals[i] * vals[i]
        return acc

    @cuda.jit(device=True, inline=True)
    def scale_store(w, wt, vals, wvals, inv_rms, dst, row, valid, lane, group):
        """dst[row] <- (values in ``w``) * inv_rms * (weight in ``wt``), packed back to the dtype."""
        for k in range(max_chunks):
            j = lane + k * group
            if valid and j < dst.shape[1]:
                unpack(w, 4 * k, vals)
                unpack(wt, 4 * k, wvals)
                for i in range(per_chunk):
                    vals[i] = (vals[i] * inv_rms) * wvals[i]
                pack(vals, w, 4 * k)
                store_words(dst[row], j, w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3])

    def rms_norm_vec(x, out, weight, eps, group):
        # x, out: (rows, chunks) complex128; weight: (chunks,) complex128; ``group`` threads per row
        w = cuda.local.array(n_words, numba.int32)  # this thread's chunks of the row, as words
        wt = cuda.local.array(n_words, numba.int32)  # ... and of the weight
        vals = cuda.local.array(8, numba.float32)
        wvals = cuda.local.array(8, numba.float32)
        partials = cuda.shared.array(WARP, numba.float32)
        pdl_trigger()  # the next kernel may launch; nothing is read before the previous one has ended
        pdl_wait()
        rows, chunks = x.shape
        s = -1 if divide else pow2_shift(group)
        per_block = div_pow2(cuda.blockDim.x, group, s)
        lane = mod_pow2(cuda.threadIdx.x, group, s)
        inv_width = numba.float32(1.0) / numba.float32(chunks * per_chunk)
        first = cuda.blockIdx.x * per_block
        while first < rows:  # the same trip count for every thread of the block (shuffles, barriers)
            row = first + div_pow2(cuda.threadIdx.x, group, s)
            load_row(x[min(row, rows - 1)], row < rows, lane, group, w)
            if weight_early:
                load_row(weight, True, lane, group, wt)
            acc = sum_squares(w, vals, chunks, lane, group) if row < rows else numba.float32(0.0)
            total = group_reduce_sum(acc, group, partials)
            if not weight_early:
                load_row(weight, True, lane, group, wt)  # only now: fewer registers held across the reduction
            inv_rms = numba.float32(1.0) / math.sqrt(total * inv_width + eps)
            scale_store(w, wt, vals, wvals, inv_rms, out, row, row < rows, lane, group)
            first += cuda.gridDim.x * per_block

    def fused_add_rms_norm_vec(x, residual, weight, eps, group):
        # x, residual: (rows, chunks) complex128, both updated in place; weight: (chunks,) complex128
        w = cuda.local.array(n_words, numba.int32)
        r = cuda.local.array(n_words, numba.int32)
        wt = cuda.local.array(n_words, numba.int32)
        vals = cuda.local.array(8, numba.float32)
        wvals = cuda.local.array(8, numba.float32)
        partials = cuda.shared.array(WARP, numba.float32)
        pdl_trigger()  # the next kernel may launch; nothing is read before the previous one has ended
        pdl_wait()
        rows, chunks = x.shape
        s = -1 if divide else pow2_shift(group)
        per_block = div_pow2(cuda.blockDim.x, group, s)
        lane = mod_pow2(cuda.threadIdx.x, group, s)
        inv_width = numba.float32(1.0) / numba.float32(chunks * per_chunk)
        first = cuda.blockIdx.x * per_block
        while first < rows:
            row = first + div_pow2(cuda.threadIdx.x, group, s)
            valid = row < rows
            load_row(x[min(row, rows - 1)], valid, lane, group, w)  # min: a valid view even past the last row
            load_row(residual[min(row, rows - 1)], valid, lane, group, r)
            if weight_early:
                load_row(weight, True, lane, group, wt)
            for k in range(max_chunks):  # residual <- x + residual, rounded to the dtype
                j = lane + k * group
                if valid and j < chunks:
                    unpack(w, 4 * k, vals)
                    unpack(r, 4 * k, wvals)
                    for i in range(per_chunk):
                        vals[i] += wvals[i]
                    pack(vals, w, 4 * k)  # ``w`` now holds the new residual: normalize it
                    store_words(residual[row], j, w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3])
            acc = sum_squares(w, vals, chunks, lane, group) if valid else numba.float32(0.0)
            total = group_reduce_sum(acc, group, partials)
            if not weight_early:
                load_row(weight, True, lane, group, wt)  # only now: fewer registers held across the reduction
            inv_rms = numba.float32(1.0) / math.sqrt(total * inv_width + eps)
            scale_store(w, wt, vals, wvals, inv_rms, x, row, valid, lane, group)
            first += cuda.gridDim.x * per_block

    def rms_norm_stream(x, out, weight, eps, group):
        # as rms_norm_vec, for a grid of at most the blocks the GPU holds at once: each thread loads its weight
        # chunks once, and the next row's chunks while it normalizes this one (two rows of registers)
        w = cuda.local.array(n_words, numba.int32)
        nx = cuda.local.array(n_words, numba.int32)  # the next row, in flight
        wt = cuda.local.array(n_words, numba.int32)
        vals = cuda.local.array(8, numba.float32)
        wvals = cuda.local.array(8, numba.float32)
        partials = cuda.shared.array(WARP, numba.float32)
        pdl_trigger()  # the next kernel may launch; nothing is read before the previous one has ended
        pdl_wait()
        rows, chunks = x.shape
        s = pow2_shift(group)
        per_block = div_pow2(cuda.blockDim.x, group, s)
        lane = mod_pow2(cuda.threadIdx.x, group, s)
        inv_width = numba.float32(1.0) / numba.float32(chunks * per_chunk)
        stride = cuda.gridDim.x * per_block
        first = cuda.blockIdx.x * per_block
        row = first + div_pow2(cuda.threadIdx.x, group, s)
        load_row(weight, True, lane, group, wt)
        load_row(x[min(row, rows - 1)], row < rows, lane, group, w)
        while first < rows:
            load_row(x[min(row + stride, rows - 1)], row + stride < rows, lane, group, nx)
            acc = sum_squares(w, vals, chunks, lane, group) if row < rows else numba.float32(0.0)
            total = group_reduce_sum(acc, group, partials)
            inv_rms = numba.float32(1.0) / math.sqrt(total * inv_width + eps)
            scale_store(w, wt, vals, wvals, inv_rms, out, row, row < rows, lane, group)
            for i in range(n_words):
                w[i] = nx[i]
            first += stride
            row += stride

    if stream:
        rms_norm_stream.__name__ = rms_norm_stream.__qualname__ = f"rms_norm_{name}_stream_kernel"
        return mark(cuda.jit(rms_norm_stream)), None
    rms_norm_vec.__name__ = rms_norm_vec.__qualname__ = f"rms_norm_{name}_kernel"
    fused_add_rms_norm_vec.__name__ = fused_add_rms_norm_vec.__qualname__ = f"fused_add_rms_norm_{name}_kernel"
    return mark(cuda.jit(rms_norm_vec)), mark(cuda.jit(fused_add_rms_norm_vec))


@functools.cache
def make_row_kernels(unpack, pack, per_chunk: int, name: str, warps: int, per_thread: int = 1, pdl: bool = True):
    """RMSNorm and fused add+RMSNorm with **a block per row and ``per_thread`` 16-byte chunks per thread**: ``warps``
    warps (``32 * warps * per_thread`` chunks at least the row's: 4 warps of one chunk, or one warp of 4 chunks, for a
    1,024-wide bf16 row), a grid of one block per row. Thread ``t`` holds chunks ``t``, ``t + 32 * warps``, ...
    Each thread issues its loads (row, residual, weight) at once, so a row waits on one memory round trip; the sum
    of squares is reduced by shuffles in each warp, then through shared memory behind a single barrier, every
    thread adding the ``warps`` partial sums itself (a loop of constant length: unrolled, where a loop over
    ``blockDim.x // 32`` took 7.1 against 4.9 µs at 4k tokens on the H100). The kernels above give a row to a warp
    or less (up to 4 chunks a thread, a longer chain of dependent work per thread), which suits many of QK-norm's
    narrow rows but not a hidden-size row (``rmsnorm.ROW_PER_BLOCK``); a few narrow rows
    (``rmsnorm.NARROW_ROW_MAX_ROWS``) take this kernel too, a block per row.

    One warp of 4 chunks a thread (``per_thread=4``) was built for the grid's waves: an H100 SM holds at most 32
    blocks and 64 warps, so 4,096 rows of 4 warps run in two waves, and blocks of one warp (at most 64 registers a
    thread) all fit at once. Launched with PDL it gained little (5.5-5.6 against 5.7-5.8 µs for RMSNorm at 4k tokens
    on the H100, the fused norm slower): the next grid's blocks, launched early, take the slots it needs. Without PDL
    (``pdl=False``: the kernels are not marked, kernels._pdl, and have no griddepcontrol instructions) RMSNorm at 4k
    tokens took 4.64 µs in ``bench.norm_variants`` on the H100 (torch.compile 4.76); ``rmsnorm.ROW_WARP_ROWS`` picks
    it for RMSNorm of 2k-6k rows."""
    stride = WARP * warps  # chunks between one thread's chunks
    n_words = 4 * per_thread

    @cuda.jit(device=True, inline=True)
    def block_sum(acc, partials):
        """The sum of ``acc`` over the block: a warp's lanes by shuffles, the warps through shared memory."""
        tid = cuda.threadIdx.x
        acc = warp_reduce_sum(acc)
        if warps == 1:
            return acc
        if tid % WARP == 0:
            partials[tid // WARP] = acc
        cuda.syncthreads()
        total = numba.float32(0.0)
        for i in range(warps):
            total += partials[i]
        return total

    def build(fused: bool):
        def norm_row(x, other, weight, eps):
            # x: (rows, chunks) complex128; other: out (RMSNorm) or, ``fused``, the residual (x and residual are
            # both updated in place); weight: (chunks,) complex128; block ``row`` normalizes row ``row``
            w = cuda.local.array(n_words, numba.int32)
            r = cuda.local.array(n_words, numba.int32)
            wt = cuda.local.array(n_words, numba.int32)
            vals = cuda.local.array(8, numba.float32)
            wvals = cuda.local.array(8, numba.float32)
            partials = cuda.shared.array(warps, numba.float32)
            chunks = x.shape[1]
            row, tid = cuda.blockIdx.x, cuda.threadIdx.x
            inv_width = numba.float32(1.0) / numba.float32(chunks * per_chunk)  # as the warp kernels round it
            acc = numba.float32(0.0)
            if pdl:  # (a constant: without PDL the kernel has no griddepcontrol instructions at all)
                pdl_trigger()
            for k in range(per_thread):  # the norm's weight, which no kernel writes, while the previous one may run
                j = tid + k * stride
                if j < chunks:
                    wt[4 * k], wt[4 * k + 1], wt[4 * k + 2], wt[4 * k + 3] = load_words(weight, j)
            if pdl:
                pdl_wait()
            for k in range(per_thread):  # every load issued before any value is used
                j = tid + k * stride
                if j < chunks:
                    w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3] = load_words(x[row], j)
                    if fused:
                        r[4 * k], r[4 * k + 1], r[4 * k + 2], r[4 * k + 3] = load_words(other[row], j)
            for k in range(per_thread):
                j = tid + k * stride
                if j < chunks:
                    unpack(w, 4 * k, vals)
                    if fused:  # residual <- x + residual, rounded to the dtype: stored, then normalized
                        unpack(r, 4 * k, wvals)
                        for i in range(per_chunk):
                            vals[i] += wvals[i]
                        pack(vals, w, 4 * k)
                        store_words(other[row], j, w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3])
                        unpack(w, 4 * k, vals)
                    for i in range(per_chunk):
                        acc += vals[i] * vals[i]
            inv_rms = numba.float32(1.0) / math.sqrt(block_sum(acc, partials) * inv_width + eps)
            for k in range(per_thread):
                j = tid + k * stride
                if j < chunks:
                    unpack(w, 4 * k, vals)
                    unpack(wt, 4 * k, wvals)
                    for i in range(per_chunk):
                        vals[i] = (vals[i] * inv_rms) * wvals[i]
                    pack(vals, w, 4 * k)
                    store_words((x if fused else other)[row], j, w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3])

        return norm_row

    rms_norm_row, fused_add_rms_norm_row = build(False), build(True)
    tag = f"w{warps}" + (f"c{per_thread}" if per_thread > 1 else "") + ("" if pdl else "_nopdl")
    rms_norm_row.__name__ = rms_norm_row.__qualname__ = f"rms_norm_row_{name}_{tag}_kernel"
    fused_add_rms_norm_row.__name__ = f"fused_add_rms_norm_row_{name}_{tag}_kernel"
    fused_add_rms_norm_row.__qualname__ = fused_add_rms_norm_row.__name__
    pair = cuda.jit(rms_norm_row), cuda.jit(fused_add_rms_norm_row)
    if pdl:  # launched with programmatic dependent launch (griddepcontrol does nothing in a launch without it)
        pair = tuple(mark(kernel) for kernel in pair)
    for kernel in pair:
        kernel.row_block, kernel.rows_per_block = stride, 1  # threads per block, rows per block
    return pair


HEAD_CHUNKS = 16  # the head kernels' row: 16 chunks, a 128-wide bf16 head (Qwen3's QK-norm)


def make_head_kernel(unpack, pack, per_chunk: int, name: str, threads: int, rows_per_thread: int, block: int,
                     pdl: bool = True):
    """RMSNorm of **many narrow rows** (QK-norm's 128-wide heads, ``HEAD_CHUNKS`` chunks each): ``threads`` threads a
    row (a power of two, at most a warp; ``HEAD_CHUNKS // threads`` chunks a thread), ``block // threads`` groups of
    them a block, each group ``rows_per_thread`` rows (all their loads issued before any is used). The sum of squares
    is reduced by ``shfl_xor`` within the row's threads alone: no shared memory, no barrier, no loop over rows.

    Built for the heads, where the warp kernels above (4 threads a head, 64-thread blocks, a loop over rows) trailed
    ``torch.compile`` at 256-1,024 tokens: measured on the H100 (``bench.norm_variants`` at b6782e2, graph replay,
    16 heads a token; bench/results/h100/17_norm_variants_cuda_session23.json), 16 threads a head in 256-thread blocks
    took 1.03 / 1.36 / 2.24 µs at 16 / 256 / 1,024 tokens against 1.90 / 2.51 / 3.37 for the warp kernels, and at
    4,096 tokens 4 threads a head of 4 rows each 10.19 against 11.13 (``rmsnorm.HEAD_LAYOUTS`` picks between them).
    Like the block-per-row kernels, the weight, which no kernel writes, is loaded before the PDL wait."""
    per_thread = HEAD_CHUNKS // threads
    n_words, w_words = 4 * per_thread * rows_per_thread, 4 * per_thread
    groups = block // threads  # row groups per block
    shift = threads.bit_length() - 1
    offsets = tuple(threads >> i for i in range(1, shift + 1))  # the shuffle distances within a row's threads
    inv_width = 1.0 / (HEAD_CHUNKS * per_chunk)

    def norm_heads(x, out, weight, eps):
        # x, out: (rows, HEAD_CHUNKS) complex128; weight: (HEAD_CHUNKS,) complex128
        w = cuda.local.array(n_words, numba.int32)
        wt = cuda.local.array(w_words, numba.int32)
        vals = cuda.local.array(8, numba.float32)
        wvals = cuda.local.array(8, numba.float32)
        acc = cuda.local.array(rows_per_thread, numba.float32)
        rows = x.shape[0]
        tid = cuda.threadIdx.x
        lane = tid & (threads - 1)
        first = (cuda.blockIdx.x * groups + (tid >> shift)) * rows_per_thread
        if pdl:
            pdl_trigger()
        for k in range(per_thread):  # the weight, which no kernel writes, while the previous kernel may still run
            wt[4 * k], wt[4 * k + 1], wt[4 * k + 2], wt[4 * k + 3] = load_words(weight, lane + k * threads)
        if pdl:
            pdl_wait()
        for r in range(rows_per_thread):  # every load issued before any value is used (a row past the end: the
            row = min(first + r, rows - 1)  # last row again, so that every lane takes part in the shuffles)
            for k in range(per_thread):
                a = 4 * (r * per_thread + k)
                w[a], w[a + 1], w[a + 2], w[a + 3] = load_words(x[row], lane + k * threads)
        for r in range(rows_per_thread):
            total = numba.float32(0.0)
            for k in range(per_thread):
                unpack(w, 4 * (r * per_thread + k), vals)
                for i in range(per_chunk):
                    total += vals[i] * vals[i]
            for offset in offsets:
                total += cuda.shfl_xor_sync(0xFFFFFFFF, total, offset)
            acc[r] = total
        for r in range(rows_per_thread):
            row = first + r
            inv_rms = numba.float32(1.0) / math.sqrt(acc[r] * numba.float32(inv_width) + eps)
            if row < rows:
                for k in range(per_thread):
                    a = 4 * (r * per_thread + k)
                    unpack(w, a, vals)
                    unpack(wt, 4 * k, wvals)
                    for i in range(per_chunk):
                        vals[i] = (vals[i] * inv_rms) * wvals[i]
                    pack(vals, w, a)
                    store_words(out[row], lane + k * threads, w[a], w[a + 1], w[a + 2], w[a + 3])

    tag = f"t{threads}r{rows_per_thread}b{block}" + ("" if pdl else "_nopdl")
    norm_heads.__name__ = norm_heads.__qualname__ = f"rms_norm_heads_{name}_{tag}_kernel"
    kernel = cuda.jit(norm_heads)
    if pdl:
        kernel = mark(kernel)
    kernel.row_block, kernel.rows_per_block = block, groups * rows_per_thread
    return kernel


@functools.cache
def head_kernel(threads: int, rows_per_thread: int, block: int, pdl: bool = True):
    """The bf16 RMSNorm head kernel of that layout (:func:`make_head_kernel`)."""
    return make_head_kernel(unpack_bf16, pack_bf16x8_cvt, 8, "bf16", threads, rows_per_thread, block, pdl)


rms_norm_bf16_kernel, fused_add_rms_norm_bf16_kernel = make_kernels(unpack_bf16, pack_bf16x8_cvt, 8, "bf16")
rms_norm_f16_kernel, fused_add_rms_norm_f16_kernel = make_kernels(unpack_f16, pack_f16x8, 8, "f16")
rms_norm_f32_kernel, fused_add_rms_norm_f32_kernel = make_kernels(unpack_f32, pack_f32x4, 4, "f32")
NORM_KERNELS = {torch.bfloat16: rms_norm_bf16_kernel, torch.float16: rms_norm_f16_kernel,
                torch.float32: rms_norm_f32_kernel}
FUSED_KERNELS = {torch.bfloat16: fused_add_rms_norm_bf16_kernel, torch.float16: fused_add_rms_norm_f16_kernel,
                 torch.float32: fused_add_rms_norm_f32_kernel}


def row_kernels(dtype: torch.dtype, warps: int, per_thread: int = 1, pdl: bool = True):
    """(RMSNorm, fused add+RMSNorm) block-per-row kernels of ``warps`` warps and ``per_thread`` chunks per thread
    (``pdl``: marked for programmatic dependent launch), or None for a dtype without them (bf16 only: the engine's)."""
    if dtype != torch.bfloat16:
        return None
    return make_row_kernels(unpack_bf16, pack_bf16x8_cvt, 8, "bf16", warps, per_thread, pdl)


ROW_SIGNATURE_WARPS = 4  # the build SIGNATURES lists for Qwen3-0.6B's 1,024-wide rows (and w1 for its 128-wide heads)


@functools.cache
def bf16_variant(cvt: bool, weight_early: bool, max_chunks: int = MAX_CHUNKS, divide: bool = False,
                 stream: bool = False):
    """(rms_norm, fused) bf16 kernels built another way, for ``bench.norm_variants`` to time against the defaults."""
    tag = f"bf16{'_cvt' if cvt else ''}{'_early' if weight_early else ''}{'_div' if divide else ''}_c{max_chunks}"
    return make_kernels(unpack_bf16, pack_bf16x8_cvt if cvt else pack_bf16x8, 8, tag, max_chunks, weight_early, divide,
                        stream)


_ROWS, _VEC = "complex128[:, ::1]", "complex128[::1]"
SIGNATURES = {
    **{f: ["void(int32[::1], int64, float32[::1])"] for f in (unpack_bf16, unpack_f16, unpack_f32)},
    **{f: ["void(float32[::1], int32[::1], int64)"] for f in (pack_bf16x8, pack_bf16x8_cvt, pack_f16x8, pack_f32x4)},
    **{k: [f"void({_ROWS}, {_ROWS}, {_VEC}, float32, int64)"]
       for k in (*NORM_KERNELS.values(), *FUSED_KERNELS.values())},
    **{k: [f"void({_ROWS}, {_ROWS}, {_VEC}, float32)"] for w in (1, ROW_SIGNATURE_WARPS)
       for k in row_kernels(torch.bfloat16, w)},  # QK-norm's 16-chunk heads (rmsnorm.NARROW_ROW_MAX_ROWS); hidden rows
    row_kernels(torch.bfloat16, 1, 4, pdl=False)[0]: [f"void({_ROWS}, {_ROWS}, {_VEC}, float32)"],  # ROW_WARP_ROWS
    **{head_kernel(*layout): [f"void({_ROWS}, {_ROWS}, {_VEC}, float32)"]
       for layout in ((16, 1, 256), (4, 4, 64))},  # QK-norm's heads (rmsnorm.HEAD_LAYOUTS)
}
