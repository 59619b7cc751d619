"""Block-quantized weights (llama.cpp's Q4_1 and Q8_0) and numba CPU kernels that multiply a few rows by them.

Decode at batch 1 on a CPU is bound by reading the weights: every token reads all of them once. The
embedded model's GGUF stores its layers as **Q4_1** (blocks of 32 weights along the input dimension, each
``w = d * q + m`` with ``q`` in 0..15: 4 bits plus two fp32 numbers per block here, 5 bits a weight) and its
embedding, our tied LM head, as **Q8_0** (``w = d * q``, ``q`` in -127..127). Read as fp32 the weights are
~540 MB a token; as blocks ~105 MB.

The weights come from the loaded fp32 model, re-quantized block by block (:func:`quantize_q4_1`,
:func:`quantize_q8_0`). For weights that were Q4_1 / Q8_0 blocks to begin with this gives the same values
back (to fp32 rounding) whenever a block's own min and max are among its values (``q = 0`` and ``q = 15``),
which the quantizer makes true for almost every block; for other checkpoints it is a lossy 4-bit copy.

The kernels: ``y[r, o] = sum_b d[o,b] * sum_j q[o,b,j] * x[r, 32b+j] + m[o,b] * sum_j x[r, 32b+j]``. The
weights are laid out in tiles of :data:`TILE` output rows, the tile's rows side by side (``P[tile, block, j,
lane]``), so the innermost loop runs over the lanes: contiguous bytes that LLVM turns into SIMD (AVX2: unpack
8 nibbles, convert, one FMA with a broadcast ``x``) while the 16 (or 32) steps of ``j`` are unrolled. A
Q4_1 byte holds ``q[j]`` in its low nibble and ``q[j + 16]`` in its high one, as in the GGUF. ``prange`` splits
the tiles over numba's threads.

Measured (2 shared cores, AVX2): the default model's 120 layer weights for one row in ~6-8 ms (13-17 G
weights/s, ~10-13 GB/s of blocks: close to the machine's ~14 GB/s read bandwidth); one FMA chain instead of four,
or a tile of 8 rows (not vectorized), was 2-4x slower.

Left out: quantizing ``x`` to int8 and integer dot products (llama.cpp's Q8_1 trick; not exact, and
numba's integer typing widens to int64 before LLVM could use ``vpmaddubsw``), input widths that are not
a multiple of 32 (such layers stay on the fp16 path), and more than a few rows (the kernel redoes the
unpacking for every row, so larger batches go to fbgemm: see :class:`minivllm.model.quant.BlockLinear`).
"""

import contextlib

import kernels  # noqa: F401  (first: it picks numba's CUDA simulator on a CPU-only machine before numba loads)
import numba
import numpy as np
import torch
from numba import njit, prange

BLOCK = 32  # weights per block along the input dimension (one scale, one min)
TILE = 32  # output rows per tile: the SIMD lanes of the inner loop (measured: 8 does not vectorize, 32 > 16)
_f32 = np.float32


def _padded(weight: torch.Tensor) -> np.ndarray:
    """(out, in) float -> numpy (out padded to a multiple of TILE, in) fp32, C-contiguous; padding rows are 0."""
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is (out, in), got shape {tuple(weight.shape)}")
    out, inp = weight.shape
    if inp % BLOCK:
        raise ValueError(f"block quantization needs in_features divisible by {BLOCK}, got {inp}")
    w = weight.detach().float()
    if out % TILE:
        w = torch.cat([w, w.new_zeros(-out % TILE, inp)])
    return w.contiguous().numpy()


# Fast-math without "reassoc": the lanes are independent, so vectorizing needs no reassociation, and keeping
# the order keeps the four accumulators below four independent FMA chains (one chain, latency-bound: 2x slower).
FASTMATH = {"contract", "nnan", "ninf", "nsz", "arcp", "afn"}


# the quantizers: no reassociation either (the error check is exact arithmetic); a tile's block (TILE rows x 32) is
# copied lanes-last, then quantized vectorized over the lanes. One thread: ~0.3 s for the default model's layers,
# where two threads on two busy cores took ~3 s (each tile's parallel region waits for a descheduled thread). The
# error they return is a block's largest |dequantized - w| beyond fp32 rounding (ROUNDING x the block's largest
# |w|), in units of its step: 0 for a weight that was these blocks, up to 0.5 for any other
ROUNDING = _f32(4 * 2.0**-24)


@njit(fastmath=FASTMATH, cache=True)
def _quantize_q4_1(w, P, D, M, limit):  # pragma: no cover - compiled
    """Fill the tiled Q4_1 arrays from w (tiles * TILE, K) fp32; returns the largest error (see above), early
    (the arrays part filled) once it passes ``limit``."""
    tiles, blocks = D.shape[0], D.shape[1]
    errs = np.zeros(tiles, np.float32)
    for t in range(tiles):
        tile = np.empty((BLOCK, TILE), np.float32)  # one block of the tile's rows, lanes last (as P)
        lo, inv, err = np.empty(TILE, np.float32), np.empty(TILE, np.float32), np.empty(TILE, np.float32)
        worst = _f32(0.0)
        for b in range(blocks):
            if worst > limit:
                break
            for lane in range(TILE):
                row = w[t * TILE + lane, b * BLOCK:(b + 1) * BLOCK]
                low, high = row.min(), row.max()
                d = (high - low) / _f32(15.0)
                D[t, b, lane], M[t, b, lane], lo[lane] = d, low, low
                inv[lane] = _f32(1.0) / d if d > 0 else _f32(0.0)
                err[lane] = _f32(0.0)
                for j in range(BLOCK):
                    tile[j, lane] = row[j]
            for j in range(16):  # byte j: q[j] | q[j + 16] << 4
                for lane in range(TILE):  # vectorized
                    v0, v1, low, d = tile[j, lane], tile[j + 16, lane], lo[lane], D[t, b, lane]
                    q0 = min(np.int32(15), max(np.int32(0), np.int32(np.floor((v0 - low) * inv[lane] + _f32(0.5)))))
                    q1 = min(np.int32(15), max(np.int32(0), np.int32(np.floor((v1 - low) * inv[lane] + _f32(0.5)))))
                    err[lane] = max(err[lane], abs(d * _f32(q0) + low - v0), abs(d * _f32(q1) + low - v1))
                    P[t, b, j, lane] = q0 | (q1 << np.int32(4))
            for lane in range(TILE):
                d = D[t, b, lane]
                e = err[lane] - ROUNDING * max(M[t, b, lane] + _f32(15.0) * d, -M[t, b, lane])
                if e > 0:
                    worst = max(worst, e / d if d > 0 else np.float32(np.inf))
        errs[t] = worst
    return errs.max()


@njit(fastmath=FASTMATH, cache=True)
def _quantize_q8_0(w, P, D, limit):  # pragma: no cover - compiled
    """Fill the tiled Q8_0 arrays from w (tiles * TILE, K) fp32; returns the largest error (see above), early
    once it passes ``limit``."""
    tiles, blocks = D.shape[0], D.shape[1]
    errs = np.zeros(tiles, np.float32)
    for t in range(tiles):
        tile = np.empty((BLOCK, TILE), np.float32)
        inv, err = np.empty(TILE, np.float32), np.empty(TILE, np.float32)
        worst = _f32(0.0)
        for b in range(blocks):
            if worst > limit:
                break
            for lane in range(TILE):
                row = w[t * TILE + lane, b * BLOCK:(b + 1) * BLOCK]
                d = max(row.max(), -row.min()) / _f32(127.0)
                D[t, b, lane] = d
                inv[lane] = _f32(1.0) / d if d > 0 else _f32(0.0)
                err[lane] = _f32(0.0)
                for j in range(BLOCK):
                    tile[j, lane] = row[j]
            for j in range(BLOCK):
                for lane in range(TILE):  # vectorized
                    v, d = tile[j, lane], D[t, b, lane]
                    q = min(np.int32(127), max(np.int32(-127), np.int32(np.floor(v * inv[lane] + _f32(0.5)))))
                    err[lane] = max(err[lane], abs(d * _f32(q) - v))
                    P[t, b, j, lane] = q
            for lane in range(TILE):
                d = D[t, b, lane]
                e = err[lane] - ROUNDING * _f32(127.0) * d
                if e > 0:
                    worst = max(worst, e / d if d > 0 else np.float32(np.inf))
        errs[t] = worst
    return errs.max()


def quantize_q4_1(weight: torch.Tensor, limit: float = np.inf) -> tuple[tuple[np.ndarray, ...], float]:
    """(out, in) float -> the tiled Q4_1 blocks ``(P, D, M)`` (``w[o, 32b + j] ≈ D * q + M``) and the largest
    error beyond fp32 rounding, in units of a block's step (0: exact; at most 0.5); once the error passes
    ``limit`` it stops (the arrays are then incomplete).

    ``P`` (tiles, blocks, 16, TILE) uint8: byte j holds q[j] (low nibble) and q[j + 16] (high nibble);
    ``D``, ``M`` (tiles, blocks, TILE) fp32: each block's step (max - min) / 15 and its min.
    """
    w = _padded(weight)
    tiles, blocks = w.shape[0] // TILE, w.shape[1] // BLOCK
    P = np.empty((tiles, blocks, 16, TILE), np.uint8)
    D, M = np.empty((tiles, blocks, TILE), np.float32), np.empty((tiles, blocks, TILE), np.float32)
    return (P, D, M), float(_quantize_q4_1(w, P, D, M, _f32(min(limit, 3e38))))


def quantize_q8_0(weight: torch.Tensor, limit: float = np.inf) -> tuple[tuple[np.ndarray, ...], float]:
    """(out, in) float -> the tiled Q8_0 blocks ``(P, D)`` (``w[o, 32b + j] ≈ D * q``) and the largest error
    (in steps beyond fp32 rounding, early past ``limit``, as :func:`quantize_q4_1`).

    ``P`` (tiles, blocks, 32, TILE) int8, q in -127..127; ``D`` (tiles, blocks, TILE) fp32: each block's max |w| / 127.
    """
    w = _padded(weight)
    tiles, blocks = w.shape[0] // TILE, w.shape[1] // BLOCK
    P, D = np.empty((tiles, blocks, BLOCK, TILE), np.int8), np.empty((tiles, blocks, TILE), np.float32)
    return (P, D), float(_quantize_q8_0(w, P, D, _f32(min(limit, 3e38))))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q4_1_matmul(x, P, D, M, y):  # pragma: no cover - compiled
    """y (R, tiles * TILE) = x (R, K) fp32 @ W.T, W the Q4_1 blocks ``(P, D, M)`` of :func:`quantize_q4_1`."""
    R, K = x.shape
    tiles, blocks = D.shape[0], D.shape[1]
    xs = np.empty((R, blocks), np.float32)  # each block's sum of x: the min's share, sum_j m * x = m * sum_j x
    x16 = np.empty((R, K), np.float32)  # x / 16 (exact): a high nibble is used as (byte & 0xF0) = 16 q
    for r in range(R):
        for b in range(blocks):
            s = _f32(0.0)
            for j in range(BLOCK):
                s += x[r, b * BLOCK + j]
            xs[r, b] = s
        for i in range(K):
            x16[r, i] = x[r, i] * _f32(0.0625)
    for t in prange(tiles):
        acc = np.empty(TILE, np.float32)  # one accumulator per output row of the tile
        for r in range(R):
            xr, hr = x[r], x16[r]
            acc[:] = 0.0
            for b in range(blocks):
                pb, db, mb, xb = P[t, b], D[t, b], M[t, b], xs[r, b]
                lo, hi = b * BLOCK, b * BLOCK + 16
                for lane in range(TILE):  # vectorized: TILE output rows side by side
                    s0 = s1 = s2 = s3 = _f32(0.0)  # four independent chains
                    for j in range(0, 16, 2):  # unrolled: byte j holds q[j] | q[j + 16] << 4
                        v, w = np.int32(pb[j, lane]), np.int32(pb[j + 1, lane])
                        s0 += _f32(v & np.int32(15)) * xr[lo + j]
                        s1 += _f32(v & np.int32(240)) * hr[hi + j]
                        s2 += _f32(w & np.int32(15)) * xr[lo + j + 1]
                        s3 += _f32(w & np.int32(240)) * hr[hi + j + 1]
                    acc[lane] += db[lane] * ((s0 + s1) + (s2 + s3)) + mb[lane] * xb
            for lane in range(TILE):
                y[r, t * TILE + lane] = acc[lane]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def q8_0_matmul(x, P, D, y):  # pragma: no cover - compiled
    """y (R, tiles * TILE) = x (R, K) fp32 @ W.T, W the Q8_0 blocks ``(P, D)`` of :func:`quantize_q8_0`."""
    R, K = x.shape
    tiles, blocks = D.shape[0], D.shape[1]
    for t in prange(tiles):
        acc = np.empty(TILE, np.float32)
        for r in range(R):
            xr = x[r]
            acc[:] = 0.0
            for b in range(blocks):
                pb, db = P[t, b], D[t, b]
                base = b * BLOCK
                for lane in range(TILE):  # vectorized over the tile's rows
                    s0 = s1 = s2 = s3 = _f32(0.0)
                    for j in range(0, BLOCK, 4):  # unrolled
                        s0 += _f32(np.int32(pb[j, lane])) * xr[base + j]
                        s1 += _f32(np.int32(pb[j + 1, lane])) * xr[base + j + 1]
                        s2 += _f32(np.int32(pb[j + 2, lane])) * xr[base + j + 2]
                        s3 += _f32(np.int32(pb[j + 3, lane])) * xr[base + j + 3]
                    acc[lane] += db[lane] * ((s0 + s1) + (s2 + s3))
            for lane in range(TILE):
                y[r, t * TILE + lane] = acc[lane]


class BlockWeight:
    """One linear layer's weight as Q4_1 (``bits=4``) or Q8_0 (``bits=8``) tiles, and its matmul with a few rows."""

    def __init__(self, weight: torch.Tensor, bits: int = 4, limit: float = np.inf):
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 (Q4_1) or 8 (Q8_0), got {bits!r}")
        self.bits = bits
        self.out_features, self.in_features = weight.shape
        quantize = quantize_q4_1 if bits == 4 else quantize_q8_0
        self.arrays, self.max_error = quantize(weight, limit)  # in steps, beyond fp32 rounding (0: exact)
        self.padded_out = self.arrays[0].shape[0] * TILE

    @property
    def kind(self) -> str:
        return "Q4_1" if self.bits == 4 else "Q8_0"

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def dequantize(self) -> torch.Tensor:
        """(out, in) fp32 with torch ops: the weight the kernel multiplies by (for checks; not the kernel's code)."""
        if self.bits == 4:
            p, d, m = (torch.from_numpy(a) for a in self.arrays)
            q = torch.cat([p & 15, p >> 4], dim=2).float()  # (tiles, B, 32, TILE)
            w = q * d[:, :, None] + m[:, :, None]
        else:
            p, d = (torch.from_numpy(a) for a in self.arrays)
            w = p.float() * d[:, :, None]  # (tiles, B, 32, TILE)
        w = w.permute(0, 3, 1, 2).reshape(self.padded_out, self.in_features)  # (O padded, K)
        return w[: self.out_features]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) fp32 -> (rows, out) fp32: ``x @ W.T`` by the numba kernel."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.padded_out, dtype=torch.float32)
        if self.bits == 4:
            q4_1_matmul(x.numpy(), *self.arrays, y.numpy())
        else:
            q8_0_matmul(x.numpy(), *self.arrays, y.numpy())
        return y if self.padded_out == self.out_features else y[:, : self.out_features]


@contextlib.contextmanager
def numba_threads(n: int):
    """The kernels' numba threads set to ``n`` (at most the core count) for a while (benchmarks' thread sweeps)."""
    old = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(old)


def exact_blocks(weight: torch.Tensor, tolerance: float = 1e-3) -> BlockWeight | None:
    """The smallest block form of ``weight`` that gives it back to fp32 rounding (Q4_1, else Q8_0), or None.

    A weight loaded from a GGUF's Q4_1 (Q8_0) blocks is exactly one; a bf16 checkpoint's is neither, and
    quantizing it would change the model, so it gets no blocks. ``tolerance``: in units of a block's step,
    beyond fp32 rounding (exact blocks come back at 0; any other weight misses by ~0.25-0.5 steps).
    """
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        return None
    for bits in (4, 8):
        blocks = BlockWeight(weight, bits, tolerance)  # stops at the first block that is not exact
        if blocks.max_error <= tolerance:
            return blocks
    return None
