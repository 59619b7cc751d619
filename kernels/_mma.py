"""Tensor-core instructions for numba kernels: ``mma.sync`` and bf16x2 / f16x2 packing, as inline PTX.

numba-cuda has no API for tensor cores. These are numba *intrinsics*: typed like functions in a kernel, they
emit one PTX instruction each into the kernel's code (LLVM inline assembly, the same mechanism numba-cuda uses
for ``activemask``), so nothing is called or linked and the fragments stay in registers. sm_80 and newer.

``mma_bf16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3)``: D = A @ B + C for one warp, A 16 x 16
(row-major), B 16 x 8 (column-major), bf16 inputs (two per uint32 word), fp32 accumulators. Each lane holds
(``g = lane // 4``, ``t = lane % 4``): a0 = row g, columns 2t, 2t+1; a1 = row g+8, same columns; a2 = row g,
columns 2t+8, 2t+9; a3 = row g+8, those columns; b0 = rows 2t, 2t+1 of column g; b1 = rows 2t+8, 2t+9 of column
g; c and d = (row g, columns 2t, 2t+1), then (row g+8, the same columns). ``mma_f16``: the same for fp16.
``pack_bf16(lo, hi)`` / ``pack_f16(lo, hi)``: two floats rounded into one word, ``lo`` in bits 0-15 (the
order of memory).
"""

from llvmlite import ir
from numba import types
from numba.cuda.extending import intrinsic

_MMA = ("mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{$0,$1,$2,$3}}, {{$4,$5,$6,$7}}, {{$8,$9}}, "
        "{{$10,$11,$12,$13}};")


def _mma(ptx_type: str):
    def typer(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        sig = types.UniTuple(types.float32, 4)(*([types.uint32] * 6 + [types.float32] * 4))

        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            asm = ir.InlineAsm(fnty, _MMA.format(t=ptx_type), "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            d = builder.call(asm, args)
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(d, i) for i in range(4)])

        return sig, codegen

    return intrinsic(typer)


def _pack(ptx_type: str):
    def typer(typingctx, lo, hi):
        sig = types.uint32(types.float32, types.float32)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.IntType(32), [ir.FloatType()] * 2)
            asm = ir.InlineAsm(fnty, f"cvt.rn.{ptx_type}x2.f32 $0, $1, $2;", "=r,f,f")
            return builder.call(asm, [args[1], args[0]])  # cvt puts its first source in the upper half

        return sig, codegen

    return intrinsic(typer)


mma_bf16 = _mma("bf16")
mma_f16 = _mma("f16")
pack_bf16 = _pack("bf16")
pack_f16 = _pack("f16")
