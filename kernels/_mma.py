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
order of memory). ``opaque(x)``: ``x`` unchanged (an int64), through an instruction the compiler may not move or
see through -- see its docstring.

For the pipelined kernel, the shared-memory and copy instructions FlashAttention-2 is built on:

* ``ldmatrix_x4(words, i)`` / ``ldmatrix_x4_trans(words, i)``: ``ldmatrix.sync.aligned.m8n8.x4[.trans]`` -- the
  warp loads four 8 x 8 matrices of 16-bit values from shared memory (``words``: a uint32 shared array). Lane
  ``l`` gives the address of row ``l % 8`` of matrix ``l // 8`` (``words[i]``, 16-byte aligned; a row is 4
  words) and receives one word of each matrix: row ``l // 4``, values ``2 (l % 4)`` and ``2 (l % 4) + 1`` --
  exactly an mma B fragment -- or, with ``.trans``, the transposed matrix's: column ``l // 4``, rows ``2 (l %
  4)`` and ``2 (l % 4) + 1`` (low half first).
* ``cp_async16(words, i, chunks, j, nbytes)``: ``cp.async.cg.shared.global`` -- copy the 16-byte element
  ``chunks[j]`` (complex128, global memory) to ``words[i .. i + 3]`` without passing through registers;
  ``nbytes`` 0 writes zeros instead (a key past the end). ``cp_async_commit()`` closes a group of copies,
  ``cp_async_wait1()`` / ``cp_async_wait0()`` wait until at most 1 / 0 groups of this thread are in flight.
  Only the issuing thread waits: a barrier after the wait makes every thread's copies visible to the block.

In numba's CUDA simulator (a CPU) the four names are Python stand-ins that compute the same results from the
same fragment layout (see the end of this module), so a kernel's indexing can be checked without a GPU.
"""

from llvmlite import ir
from numba import types
from numba.cuda.extending import intrinsic

from kernels._env import simulator_enabled

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


@intrinsic
def opaque(typingctx, x):
    """``x`` (int64) unchanged, as the output of a volatile ``mov``: the compiler cannot hoist it out of a loop.

    Why a kernel wants that: the shared-memory addresses of a warp's mma fragments depend on the lane only, so
    the compiler computes all of them once, before the key loop -- 256 addresses for head_dim 128, each a
    64-bit register held across the loop, and ptxas spills. Derived from ``opaque(lane_offset)`` inside the
    loop, they become one base register plus constant offsets, which the load instructions take as immediates.
    """
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        return builder.call(ir.InlineAsm(fnty, "mov.b64 $0, $1;", "=l,l", side_effect=True), [args[0]])

    return sig, codegen


def _element_address(context, builder, array_type, array, index):
    """The generic address (int64) of ``array[index]`` (1-D, no wraparound: indices are never negative here)."""
    from numba.cuda import cgutils

    array = context.make_array(array_type)(context, builder, array)
    ptr = cgutils.get_item_pointer(context, builder, array_type, array, [index])
    return builder.ptrtoint(ptr, ir.IntType(64))


# volatile and clobbering memory: the compiler may neither hoist a load out of the key loop (its address does not
# change, the data does) nor move a copy or a load across a barrier
_LDSM = ("{{ .reg .u64 s; cvta.to.shared.u64 s, $4; "
         "ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{$0,$1,$2,$3}}, [s]; }}")


def _ldmatrix(trans: bool):
    def typer(typingctx, words, index):
        sig = types.UniTuple(types.uint32, 4)(words, index)

        def codegen(context, builder, signature, args):
            address = _element_address(context, builder, signature.args[0], args[0], args[1])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([i32] * 4), [ir.IntType(64)])
            asm = ir.InlineAsm(fnty, _LDSM.format(trans=".trans" if trans else ""), "=r,=r,=r,=r,l,~{memory}",
                               side_effect=True)
            d = builder.call(asm, [address])
            return context.make_tuple(builder, signature.return_type, [builder.extract_value(d, i) for i in range(4)])

        return sig, codegen

    return intrinsic(typer)


@intrinsic
def cp_async16(typingctx, words, index, chunks, j, nbytes):
    """``words[index .. index + 3] <- chunks[j]`` (16 bytes, global -> shared) asynchronously; see the module."""
    sig = types.void(words, index, chunks, j, types.int32)

    def codegen(context, builder, signature, args):
        dst = _element_address(context, builder, signature.args[0], args[0], args[1])
        src = _element_address(context, builder, signature.args[2], args[2], args[3])
        size = context.cast(builder, args[4], signature.args[4], types.int32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64), ir.IntType(64), ir.IntType(32)])
        asm = ir.InlineAsm(fnty, "{ .reg .u64 s, g; cvta.to.shared.u64 s, $0; cvta.to.global.u64 g, $1; "
                                 "cp.async.cg.shared.global [s], [g], 16, $2; }", "l,l,r,~{memory}", side_effect=True)
        builder.call(asm, [dst, src, size])
        return context.get_dummy_value()

    return sig, codegen


def _asm_statement(text: str):
    def typer(typingctx):
        def codegen(context, builder, signature, args):
            builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True), [])
            return context.get_dummy_value()

        return types.void(), codegen

    return intrinsic(typer)


ldmatrix_x4 = _ldmatrix(False)
ldmatrix_x4_trans = _ldmatrix(True)
cp_async_commit = _asm_statement("cp.async.commit_group;")
cp_async_wait1 = _asm_statement("cp.async.wait_group 1;")
cp_async_wait0 = _asm_statement("cp.async.wait_group 0;")
mma_bf16 = _mma("bf16")
mma_f16 = _mma("f16")
pack_bf16 = _pack("bf16")
pack_f16 = _pack("f16")


# ----------------------------------------------------------------------------- the CUDA simulator
# The simulator runs a kernel's Python source thread by thread; it cannot run PTX. These stand-ins compute what
# the instructions compute, from the fragment layout of NVIDIA's PTX ISA (above): each lane publishes its
# fragments, rebuilds the whole A (16 x 16) and B (16 x 8) from the warp's, and keeps its own four results. The
# kernels' simulator tests check the kernels' indexing against that layout.
def _halves_to_floats(bits, ptx_type: str):
    """uint32 array of 16-bit values -> their float64 values (bf16 or fp16)."""
    import numpy as np

    if ptx_type == "bf16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


def _float_to_bits(x: float, ptx_type: str) -> int:
    import numpy as np
    import torch

    if ptx_type == "bf16":
        return int(torch.tensor(float(x), dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF
    return int(np.array(x, dtype=np.float16).view(np.uint16))


def _simulated_mma(ptx_type: str):
    import numpy as np

    g, t = np.arange(32) // 4, np.arange(32) % 4  # every lane's group and thread-in-group
    a_at = [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]  # (row, column) of a0..a3's low half
    b_at = [(2 * t, g), (2 * t + 8, g)]  # (row, column) of b0, b1's low half

    def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        import threading

        from kernels._simulator import warp_values

        words = np.array(warp_values(tuple(int(np.uint32(x)) for x in (a0, a1, a2, a3, b0, b1))), dtype=np.uint32)
        lo = _halves_to_floats(words & np.uint32(0xFFFF), ptx_type)  # (32 lanes, 6 words)
        hi = _halves_to_floats(words >> np.uint32(16), ptx_type)
        A, B = np.zeros((16, 16)), np.zeros((16, 8))
        for i, (row, col) in enumerate(a_at):
            A[row, col], A[row, col + 1] = lo[:, i], hi[:, i]
        for i, (row, col) in enumerate(b_at):
            B[row, col], B[row + 1, col] = lo[:, 4 + i], hi[:, 4 + i]
        D = A @ B
        lane = threading.current_thread().thread_id % 32
        r, c = lane // 4, 2 * (lane % 4)
        return (np.float32(D[r, c] + c0), np.float32(D[r, c + 1] + c1),
                np.float32(D[r + 8, c] + c2), np.float32(D[r + 8, c + 1] + c3))

    return mma


def _simulated_pack(ptx_type: str):
    def pack(lo, hi):
        import numpy as np

        return np.uint32(_float_to_bits(lo, ptx_type) | (_float_to_bits(hi, ptx_type) << 16))

    return pack


def _simulated_ldmatrix(trans: bool):
    def ldmatrix(words, index):
        import threading

        from kernels._simulator import warp_values

        rows = warp_values(int(index))  # lane 8m + r gave the first word of row r of matrix m
        lane = threading.current_thread().thread_id % 32

        def half(m: int, row: int, col: int) -> int:  # the 16-bit value at (row, col) of matrix m
            word = int(words[rows[8 * m + row] + col // 2])
            return (word >> (16 * (col % 2))) & 0xFFFF

        out = []
        for m in range(4):
            if trans:  # column lane // 4, rows 2 (lane % 4) and 2 (lane % 4) + 1
                lo, hi = half(m, 2 * (lane % 4), lane // 4), half(m, 2 * (lane % 4) + 1, lane // 4)
            else:  # row lane // 4, columns 2 (lane % 4) and 2 (lane % 4) + 1: one word
                lo, hi = half(m, lane // 4, 2 * (lane % 4)), half(m, lane // 4, 2 * (lane % 4) + 1)
            out.append(lo | (hi << 16))
        return tuple(out)

    return ldmatrix


def _simulated_cp_async16(words, index, chunks, j, nbytes):
    """The copy, done at once: the barrier that follows a wait on the GPU orders it the same way here."""
    import numpy as np

    values = np.array([chunks[j]], dtype=np.complex128).view(np.uint32) if nbytes else np.zeros(4, np.uint32)
    for i in range(4):  # the element's bytes as four words, in memory order
        words[index + i] = values[i]


def _nothing() -> None:
    """cp.async's commit and wait: nothing to do where the copies complete at once."""


def _use_simulator() -> None:
    global mma_bf16, mma_f16, pack_bf16, pack_f16, opaque, ldmatrix_x4, ldmatrix_x4_trans, cp_async16
    global cp_async_commit, cp_async_wait1, cp_async_wait0
    mma_bf16, mma_f16 = _simulated_mma("bf16"), _simulated_mma("f16")
    pack_bf16, pack_f16 = _simulated_pack("bf16"), _simulated_pack("f16")
    opaque = int
    ldmatrix_x4, ldmatrix_x4_trans = _simulated_ldmatrix(False), _simulated_ldmatrix(True)
    cp_async16 = _simulated_cp_async16
    cp_async_commit = cp_async_wait1 = cp_async_wait0 = _nothing


if simulator_enabled():
    _use_simulator()
