"""Sum a value over the threads that share a row: the reduction RMSNorm's kernels (scalar and 16-byte) use.

Its own module so that ``kernels.rmsnorm`` and ``kernels._rmsnorm_vec`` both import it and neither imports
the other. Left out: reductions other than a sum, and groups that are not a power of two.
"""

import numba
from numba import cuda

from kernels.basics import FULL_MASK, WARP, warp_reduce_sum


@cuda.jit(device=True, inline=True)
def group_reduce_sum(value, group, partials):
    """Sum ``value`` over the ``group`` threads of a row; every one of them gets the total.

    ``group`` <= 32: aligned lanes of one warp, butterfly shuffles. ``group`` > 32: the whole block
    (``group == blockDim.x``): each warp reduces, lane 0 writes ``partials[warp]``, a barrier, and every
    warp reduces the partials (so all threads make the same calls: the simulator needs it).
    """
    if group > WARP:
        tid = cuda.threadIdx.x
        value = warp_reduce_sum(value)
        if tid % WARP == 0:
            partials[tid // WARP] = value
        cuda.syncthreads()
        value = partials[tid % WARP] if tid % WARP < cuda.blockDim.x // WARP else numba.float32(0.0)
        value = warp_reduce_sum(value)
        cuda.syncthreads()  # all have read ``partials`` before the next row writes it
        return value
    offset = group // 2
    while offset > 0:
        value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
        offset //= 2
    return value
