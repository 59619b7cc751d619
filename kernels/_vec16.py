"""16-byte loads and stores for kernels on bf16 and fp32 rows, as four 32-bit words.

A load instruction moves at most 16 bytes per thread. A kernel that reads one bf16 (2 bytes) per
instruction needs eight times as many instructions as one that reads 16 bytes, and on the H200 a
4-byte-per-thread copy reaches only about half of HBM bandwidth (bench/results/01_basics.json) while
a 16-byte one reaches it. numba has no bf16x8 vector type, so we view a row as ``complex128`` (one
16-byte element), load each element as four 32-bit words, and unpack each word into two bf16 (or one
fp32) values -- and the reverse for stores.

    word  = [ hi bf16 | lo bf16 ]     lo = element 2k, hi = element 2k+1 (little endian)
    bf16 -> fp32: the 16 bits become the top half of the fp32 (exact)
    fp32 -> bf16: round to nearest even, keep the top 16 bits (inf stays inf; every NaN becomes the quiet NaN 0x7FC0)

On a GPU, :func:`load_words` and :func:`store_words` are single ``ld.global.v4.u32`` / ``st.global.v4.u32``
instructions (``LDG.E.128`` / ``STG.E.128`` in the machine code): numba intrinsics that load the element as
a vector of four int32. numba's own ``chunks[j]`` on a complex128 array compiles to *two* 8-byte loads
(the real and the imaginary double), which is what these helpers did until the machine code was read
(``python -m kernels._ptx`` counts each kernel's load widths). The vector access assumes the element is
16-byte aligned: every CUDA allocation is, and ``tensor.view(torch.complex128)`` only accepts offsets in
whole 16-byte elements; launchers that take any caller's tensors check it (:func:`aligned16`).

In numba's CUDA simulator the same helpers split the complex value with ``libdevice`` bit casts, which the
simulator implements only as stubs; kernels._simulator gives it these casts.
"""

import numba
import torch
from numba import config, cuda
from numba.cuda import libdevice

_LOW32 = 0xFFFFFFFF
_HIGH16 = -65536  # 0xFFFF0000 as an int32


def aligned16(*tensors: torch.Tensor) -> bool:
    """Whether every tensor starts on a 16-byte boundary (what the 16-byte loads and stores need)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


if config.ENABLE_CUDASIM:
    @cuda.jit(device=True, inline=True)
    def load_words(chunks, j):
        """The four 32-bit words of the 16-byte element ``chunks[j]`` (a complex128 array)."""
        z = chunks[j]
        a = libdevice.double_as_longlong(z.real)
        b = libdevice.double_as_longlong(z.imag)
        return (numba.int32(a & _LOW32), numba.int32(a >> 32), numba.int32(b & _LOW32), numba.int32(b >> 32))

    @cuda.jit(device=True, inline=True)
    def store_words(chunks, j, w0, w1, w2, w3):
        """Write four 32-bit words as the 16-byte element ``chunks[j]``."""
        a = (numba.int64(w1) << 32) | (numba.int64(w0) & _LOW32)
        b = (numba.int64(w3) << 32) | (numba.int64(w2) & _LOW32)
        chunks[j] = complex(libdevice.longlong_as_double(a), libdevice.longlong_as_double(b))
else:
    from llvmlite import ir
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic

    _V4 = ir.VectorType(ir.IntType(32), 4)

    def _pointer(context, builder, array_type, array, index):
        """``&chunks[index]`` as a pointer to four int32 (no wraparound: indices are never negative here)."""
        array = context.make_array(array_type)(context, builder, array)
        ptr = cgutils.get_item_pointer(context, builder, array_type, array, [index])
        return builder.bitcast(ptr, _V4.as_pointer())

    @intrinsic
    def load_words(typingctx, chunks, j):
        """The four 32-bit words of the 16-byte element ``chunks[j]`` (complex128), in one instruction."""

        def codegen(context, builder, sig, args):
            vec = builder.load(_pointer(context, builder, sig.args[0], args[0], args[1]), align=16)
            words = [builder.extract_element(vec, ir.Constant(ir.IntType(32), i)) for i in range(4)]
            return context.make_tuple(builder, sig.return_type, words)

        return types.UniTuple(types.int32, 4)(chunks, j), codegen

    @intrinsic
    def store_words(typingctx, chunks, j, w0, w1, w2, w3):
        """Write four 32-bit words as the 16-byte element ``chunks[j]``, in one instruction."""

        def codegen(context, builder, sig, args):
            vec = ir.Constant(_V4, None)
            for i in range(4):
                word = context.cast(builder, args[2 + i], sig.args[2 + i], types.int32)
                vec = builder.insert_element(vec, word, ir.Constant(ir.IntType(32), i))
            builder.store(vec, _pointer(context, builder, sig.args[0], args[0], args[1]), align=16)
            return context.get_dummy_value()

        return types.void(chunks, j, w0, w1, w2, w3), codegen


@cuda.jit(device=True, inline=True)
def bf16_lo(word):
    """The fp32 value of the low bf16 in ``word``."""
    return libdevice.int_as_float(numba.int32(word << 16))


@cuda.jit(device=True, inline=True)
def bf16_hi(word):
    """The fp32 value of the high bf16 in ``word``."""
    return libdevice.int_as_float(numba.int32(word & _HIGH16))


@cuda.jit(device=True, inline=True)
def bf16_bits(x):
    """fp32 ``x`` rounded to the nearest bf16 (ties to even), as 16 bits in an int32."""
    bits = libdevice.float_as_int(x)
    if (bits & 0x7FFFFFFF) > 0x7F800000:  # NaN: the rounding add below would overflow into the sign
        return 0x7FC0  # an integer test: under fastmath a float `x != x` is optimised away
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16) & 0xFFFF


@cuda.jit(device=True, inline=True)
def pack_bf16(lo, hi):
    """One word holding fp32 ``lo`` and ``hi`` rounded to bf16."""
    return numba.int32(bf16_bits(lo) | (bf16_bits(hi) << 16))


@cuda.jit(device=True, inline=True)
def f32(word):
    return libdevice.int_as_float(word)


@cuda.jit(device=True, inline=True)
def f32_word(x):
    return libdevice.float_as_int(x)


@cuda.jit
def _roundtrip_kernel(src, dst, scale):
    """Test kernel: dst = bf16(src * scale), 8 bf16 per thread, through words."""
    j = cuda.grid(1)
    if j < src.size:
        w0, w1, w2, w3 = load_words(src, j)
        w0 = pack_bf16(bf16_lo(w0) * scale, bf16_hi(w0) * scale)
        w1 = pack_bf16(bf16_lo(w1) * scale, bf16_hi(w1) * scale)
        w2 = pack_bf16(bf16_lo(w2) * scale, bf16_hi(w2) * scale)
        w3 = pack_bf16(bf16_lo(w3) * scale, bf16_hi(w3) * scale)
        store_words(dst, j, w0, w1, w2, w3)


SIGNATURES = {  # load_words / store_words: intrinsics on a GPU, compiled inside the kernels that call them
    bf16_lo: ["float32(int32)"],
    bf16_hi: ["float32(int32)"],
    bf16_bits: ["int32(float32)"],
    pack_bf16: ["int32(float32, float32)"],
    f32: ["float32(int32)"],
    f32_word: ["int32(float32)"],
    _roundtrip_kernel: ["void(complex128[::1], complex128[::1], float32)"],
}
