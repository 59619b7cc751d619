"""FP8 (e4m3) values for kernels: one byte per K or V element of the paged cache.

Decode attention reads every cached K and V byte once per step, so its time is the cache's size over the memory
bandwidth. Storing K and V as 8-bit floats instead of bf16 halves the bytes, so it halves that time too. The cost
is precision: e4m3 keeps 3 mantissa bits (bf16 keeps 7). vLLM calls this ``kv_cache_dtype="fp8"``.

    e4m3 ("fn": finite, no infinities):  sign | exponent (4 bits, bias 7) | mantissa (3 bits)
    normal    (exponent 1..15):  (-1)^s * 2^(e - 7) * (1 + m / 8)     largest 0x7E = 448
    subnormal (exponent 0):      (-1)^s * 2^-6 * (m / 8)             smallest 2^-9
    0x7F / 0xFF: NaN

Values are stored unscaled: vLLM's default when a checkpoint brings no K/V scales. Qwen3's keys leave QK-norm
with an RMS of about the norm's weight, far inside +-448.

**Writing** (:func:`e4m3_byte`): fp32 -> the nearest e4m3, ties to even, saturating at +-448 (as NVIDIA's
``__NV_SATFINITE`` conversion does). It is integer work on the fp32 bits: round the mantissa to 3 bits, then
rebias the exponent from 127 to 7. Values below 2^-6 become multiples of 2^-9 instead.

**Reading** (:func:`e4m3x4_over256`): the decode kernel loads 16 cache bytes per lane, four per 32-bit word.
Shifted into the top of a 16-bit half, an e4m3 byte *is* an fp16 whose exponent field is 4 bits too small, so
its value is the e4m3 value divided by 2^8 (the biases differ by 15 - 7). Subnormals map onto fp16 subnormals
too::

    e4m3  s eeee mmm              -> fp16  s 0eeee mmm 0000000        (value / 256)

Two masks and a shift move two bytes of a word into one fp16 pair at once; a hardware conversion then widens
each half to fp32 exactly (:func:`f16x2_floats`, one ``cvt.f32.f16`` each). The kernel multiplies its queries by
256 once instead of every value. The same conversion in floating-point arithmetic on the fp32 bits would need
fp32 subnormals, which ``fastmath`` kernels flush to zero.

On sm_89 (Ada) and newer GPUs the hardware converts e4m3 itself: ``cvt.rn.f16x2.e4m3x2`` widens two bytes to an
fp16 pair in one instruction (:func:`e4m3x4_floats`: 6 instructions a word, against ~12 for the masks and shifts in
the sm_90 machine code of the decode kernel).
With the masks and shifts the decode kernel reached 54-80% of its floor on an H100 (bf16: 81-98%): its arithmetic,
not memory, sets the pace there. ``kernels.paged_attention_warp.FP8_CVT`` takes the hardware's conversion on sm_89+
(the default); the masks and shifts serve older GPUs and the simulator's checks.

**Arithmetic in fp16 pairs** (:func:`e4m3x4_halves`, :func:`e4m3x4_halves_over256`, :func:`hfma2`): an fp16 pair
fits a 32-bit register, and ``fma.rn.f16x2`` multiplies and adds both halves in one instruction. The decode kernel
keeps the widened bytes as pairs and multiplies them against fp16 pairs of the queries (then of the softmax
weights), going back to fp32 once per token's score and once per trip's weighted values: in the sm_90 code, as
many instructions per byte read as the bf16 kernel (the hardware conversion with fp32 arithmetic: 1.2x as many;
masks and shifts: 1.35x; ``kernels._ptx.main_loop``, checked by tests/test_01_compile.py). fp16 keeps 11
mantissa bits, more than e4m3's 4, so the values lose nothing; the sums of a few products in fp16 cost ~1e-3 of the
output (fp32: ~1e-4). On the H100 this reached 79-91% of the floor
at batch >= 32 (``bench/results/17_fp8_decode_variants_cuda.json``); ``FP8_HALF2`` switches it.

In numba's CUDA simulator (a CPU), the intrinsics (:func:`f16x2_floats`, :func:`e4m3x4_floats`, :func:`hfma2`,
...) are numpy / PyTorch stand-ins; the rest is the same code.
``tests/test_17_fp8_kv.py`` checks both directions against PyTorch's own ``float8_e4m3fn`` conversions.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import cuda, types
from numba.cuda import libdevice
from numba.cuda.extending import intrinsic

from kernels._env import simulator_enabled

E4M3_MAX = 448.0
UNPACK_SCALE = 256.0  # e4m3x4_over256's values times this are the stored values


@intrinsic
def f16x2_floats(typingctx, word):
    """The two fp16 values in a 32-bit word (low half first), as fp32: exact, subnormals included."""
    sig = types.UniTuple(types.float32, 2)(word)

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        fnty = ir.FunctionType(ir.LiteralStructType([f32, f32]), [i32])
        asm = ir.InlineAsm(fnty, "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
                           "=f,=f,r")
        w = context.cast(builder, args[0], signature.args[0], types.int32)
        pair = builder.call(asm, [w])
        return context.make_tuple(builder, signature.return_type, [builder.extract_value(pair, i) for i in range(2)])

    return sig, codegen


_CVT4 = ("{ .reg .b16 l, h, a0, a1, b0, b1; .reg .b32 a, b; mov.b32 {l, h}, $4; "
         "cvt.rn.f16x2.e4m3x2 a, l; cvt.rn.f16x2.e4m3x2 b, h; mov.b32 {a0, a1}, a; mov.b32 {b0, b1}, b; "
         "cvt.f32.f16 $0, a0; cvt.f32.f16 $1, a1; cvt.f32.f16 $2, b0; cvt.f32.f16 $3, b1; }")


@intrinsic
def e4m3x4_floats(typingctx, word):
    """The four e4m3 values of ``word`` (byte 0 first) as fp32, exact, by the hardware's own conversion
    (``cvt.rn.f16x2.e4m3x2``, two bytes to an fp16 pair in one instruction): **sm_89 (Ada) and newer only**."""
    sig = types.UniTuple(types.float32, 4)(word)

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32])
        w = context.cast(builder, args[0], signature.args[0], types.int32)
        out = builder.call(ir.InlineAsm(fnty, _CVT4, "=f,=f,=f,=f,r"), [w])
        return context.make_tuple(builder, signature.return_type, [builder.extract_value(out, i) for i in range(4)])

    return sig, codegen


@intrinsic
def hfma2(typingctx, a, b, c):
    """``a * b + c`` on fp16 pairs held in 32-bit words (``fma.rn.f16x2``: two fp16 multiply-adds, one instruction,
    each rounded once)."""
    sig = types.int32(a, b, c)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        asm = ir.InlineAsm(ir.FunctionType(i32, [i32] * 3), "fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r")
        return builder.call(asm, [context.cast(builder, v, t, types.int32) for v, t in zip(args, signature.args)])

    return sig, codegen


@intrinsic
def f16x2_of(typingctx, lo, hi):
    """fp32 ``lo`` and ``hi`` rounded to fp16 (to nearest, ties to even) and packed in one word, ``lo`` low."""
    sig = types.int32(lo, hi)

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        asm = ir.InlineAsm(ir.FunctionType(i32, [f32, f32]),
                           "{ .reg .b16 l, h; cvt.rn.f16.f32 l, $1; cvt.rn.f16.f32 h, $2; mov.b32 $0, {l, h}; }",
                           "=r,f,f")
        return builder.call(asm, [context.cast(builder, v, t, types.float32) for v, t in zip(args, signature.args)])

    return sig, codegen


_CVT2 = ("{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.rn.f16x2.e4m3x2 $0, l; cvt.rn.f16x2.e4m3x2 $1, h; }")


@intrinsic
def e4m3x4_halves(typingctx, word):
    """The four e4m3 values of ``word`` as two fp16 pairs, (byte 0, byte 1) and (byte 2, byte 3), exact, by the
    hardware's conversion: **sm_89 (Ada) and newer only**."""
    sig = types.UniTuple(types.int32, 2)(word)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.LiteralStructType([i32, i32]), [i32])
        w = context.cast(builder, args[0], signature.args[0], types.int32)
        out = builder.call(ir.InlineAsm(fnty, _CVT2, "=r,=r,r"), [w])
        return context.make_tuple(builder, signature.return_type, [builder.extract_value(out, i) for i in range(2)])

    return sig, codegen


def _f16_pair(word):
    return np.array([int(word) & 0xFFFFFFFF], dtype=np.uint32).view(np.float16)


def _pair_word(lo, hi) -> np.int32:
    return np.array([lo, hi], dtype=np.float16).view(np.int32)[0]


def _simulated_hfma2(a, b, c):  # fp16 products are exact in fp64, so the sum is rounded once (to fp16)
    x, y, z = (_f16_pair(v).astype(np.float64) for v in (a, b, c))
    r = x * y + z
    return _pair_word(r[0], r[1])


def _simulated_f16x2_of(lo, hi):
    return _pair_word(np.float32(lo), np.float32(hi))


def _simulated_e4m3x4_halves(word):
    v = _simulated_e4m3x4_floats(word)
    return _pair_word(v[0], v[1]), _pair_word(v[2], v[3])


def _simulated_f16x2_floats(word):
    halves = np.array([int(word) & 0xFFFFFFFF], dtype=np.uint32).view(np.float16)
    return np.float32(halves[0]), np.float32(halves[1])


def _simulated_e4m3x4_floats(word):
    import torch

    codes = torch.from_numpy(np.array([int(word) & 0xFFFFFFFF], dtype=np.uint32).view(np.uint8).copy())
    return tuple(np.float32(v) for v in codes.view(torch.float8_e4m3fn).float().tolist())


if simulator_enabled():
    f16x2_floats = _simulated_f16x2_floats  # noqa: F811
    e4m3x4_floats = _simulated_e4m3x4_floats  # noqa: F811
    hfma2 = _simulated_hfma2  # noqa: F811
    f16x2_of = _simulated_f16x2_of  # noqa: F811
    e4m3x4_halves = _simulated_e4m3x4_halves  # noqa: F811


def to_e4m3_bytes(x: "torch.Tensor") -> "torch.Tensor":
    """PyTorch's e4m3 rounding of ``x`` (ties to even), saturated at +-448 as :func:`e4m3_byte` is (PyTorch's own
    cast gives NaN past it), as uint8 bytes: what an fp8 pool holds. The torch paths store with it."""
    import torch

    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


@cuda.jit(device=True, inline=True)
def e4m3_byte(x):
    """fp32 ``x`` as the nearest e4m3 (ties to even, +-448 at most; NaN stays NaN), as 8 bits in an int32."""
    bits = libdevice.float_as_int(numba.float32(x))
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF  # integer tests throughout: under fastmath a float `x != x` is optimised away
    if mag > 0x7F800000:  # NaN
        return sign | 0x7F
    if mag >= 0x43E00000:  # 448 and above (inf too): the largest finite value
        return sign | 0x7E
    if mag < 0x3C800000:  # below 2^-6: a subnormal, a multiple of 2^-9 (2^-6 itself, code 8, is the rounding's top)
        return sign | numba.int32(round(libdevice.int_as_float(mag) * numba.float32(512.0)))
    mag += 0x7FFFF + ((mag >> 20) & 1)  # keep 3 mantissa bits, ties to even (a carry bumps the exponent)
    return sign | (((mag >> 20) - (120 << 3)) & 0x7F)  # exponent bias 127 -> 7




@cuda.jit(device=True, inline=True)
def e4m3x4_halves_over256(word):
    """The four e4m3 values of ``word``, each divided by 256, as two fp16 pairs: (byte 0, byte 2) and
    (byte 1, byte 3), exact."""
    w = numba.int64(word) & 0xFFFFFFFF
    even = ((w & 0x00800080) << 8) | ((w & 0x007F007F) << 7)  # bytes 0 and 2 -> fp16 bits of the two halves
    odd = (w & 0x80008000) | ((w & 0x7F007F00) >> 1)  # bytes 1 and 3
    return numba.int32(even & 0xFFFFFFFF), numba.int32(odd & 0xFFFFFFFF)


@cuda.jit(device=True, inline=True)
def e4m3x4_over256(word):
    """The four e4m3 values of ``word`` (byte 0 first), each divided by 256, as fp32 (exact): the fp16 pairs of
    :func:`e4m3x4_halves_over256`, each half widened by one ``cvt.f32.f16``."""
    even, odd = e4m3x4_halves_over256(word)
    v0, v2 = f16x2_floats(even)
    v1, v3 = f16x2_floats(odd)
    return v0, v1, v2, v3


SIGNATURES = {  # f16x2_floats, e4m3x4_floats: intrinsics, compiled inside the functions that call them
    e4m3_byte: ["int32(float32)", "int32(bfloat16)"],
    e4m3x4_over256: ["Tuple((float32, float32, float32, float32))(int32)"],
    e4m3x4_halves_over256: ["UniTuple(int32, 2)(int32)"],
}
