"""From the qkv projection to attention's inputs in one pass: QK-norm, RoPE and the KV store, fused.

Each attention layer turns the output of its ``qkv_proj`` matmul, ``(tokens, (q_heads + 2 kv_heads) * d)``, into
attention's inputs with four element-wise steps, each a kernel launch of its own (plus copies that make the
strided q, k and v views contiguous):

    q, k   = rms_norm(q_heads), rms_norm(k_heads)   # Qwen3's QK-norm (Llama: none)
    q, k   = rope(q, k, positions)                  # rotate each head's pairs (i, i + d/2)
    cache <- store_kv(k, v, slot_mapping)           # this step's keys and values into the paged cache

Every one of them reads a head vector and writes it back: fused, each head is read once and written once. One
block per (token, head) with ``d / 2`` threads, a thread per pair ``(i, i + d/2)`` -- exactly the pair RoPE
rotates, so nothing moves between threads except the sum of squares of the norm (a shuffle reduction). A key
head's block also stores it, and its value head, into the cache. On a GPU this turns ~7 launches per layer into 1
(28 layers: ~170 fewer kernels per step), which is what batch-1 decode and the eager prefill pay for.

The roundings are the unfused kernels' (``kernels.rmsnorm`` then ``kernels.rope``): the norm's fp32 result is
rounded to the dtype (written, read back), then RoPE's fp32 result is rounded once more.

A second kernel takes a **warp per (token, head)** (``warp=True``, ``WARP_PER_HEAD``; head sizes 64, 128, 256):
each lane holds 1-4 pairs in registers, the norm's sum is reduced by shuffles alone, and a 128-thread block
holds four heads. At prefill sizes the block kernel is latency-bound: on the H200 it took 0.21 ms a layer for
8,165 tokens, ~7x the time its bytes need (``bench/results/17_step_breakdown_cuda.json``, the mixed step's
profile), one 64-thread block per head waiting on a block-wide reduction. The warp kernel is checked against the
block kernel and the references in the simulator. It takes steps of ``WARP_MIN_TOKENS`` tokens or more: on the H100
it ran 4,096 tokens in 92 against 116 µs, while one token (a batch-1 decode step, 24 heads) is faster on the block
kernel, 3.7 against 4.3 µs (``python -m kernels.qkv_prep`` times both at several sizes).

A third kernel, for bf16 at head size 128 (``vec=True``, ``VEC_KERNEL``, the engine's at every size), keeps
the warp per (token, head) but moves **4-byte words** (two bf16) where the others move 2-byte values: lane ``l``
takes words ``l, l + 32, ...`` of the head's first half and the same words of its second half, which are exactly
their RoPE partners. It rounds the norm's result in registers (``cvt.rn.bf16x2`` and back) instead of storing and
re-reading it, and loads the position, the slot and the weights before the head. Its bits are the other kernels'
(checked in the simulator). H100, CUDA-graph replay, Qwen3-0.6B's heads, block / warp / word-wide kernel: 1 token
3.61 / 4.29 / 2.62 µs, 140 tokens (the offline workload's mean decode batch) 7.27 / 7.16 / 4.38 µs, 4,096 tokens
129.6 / 114.1 / 66.5 µs; the offline workload ran at 18,726 and 18,555 tok/s against 18,404 and 18,177 with the
earlier kernels (A/B/A/B, ``bench/results/h100/12_throughput_cuda_qkvvec_*.json``).

Limits: ``d / 2`` a power of two up to 1024 (head sizes 64, 128, 256); q, k and v heads in qkv's column order
(q's heads, then k's, then v's: ``Qwen3Attention``'s split); positions outside the RoPE table give NaN (no GPU
sync to check), slots are not checked on the GPU. ``python -m kernels.qkv_prep`` checks it against the reference.
"""

import functools
import math

import numba
import numpy as np
import torch
from numba import cuda

from kernels._checks import FLOAT_DTYPES, FP8, check_tensor
from kernels._fp8 import e4m3_byte
from kernels._index import div_pow2, mod_pow2, pow2_shift
from kernels._launch import launch, resolve_backend
from kernels._mma import pack_bf16 as cvt_pack_bf16
from kernels._pdl import mark, pdl_trigger, pdl_wait
from kernels._reduce import group_reduce_sum
from kernels._vec16 import bf16_hi, bf16_lo
from kernels.basics import WARP, warp_reduce_sum
from kernels.rmsnorm import rms_norm_ref
from kernels.rope import apply_rope_ref, check_positions
from kernels.store_kv import store_kv_ref


# ----------------------------------------------------------------------------- reference
def split_qkv(qkv: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int):
    """Views (tokens, heads, d) of q, k and v in the projection's output (strided: no copy)."""
    tokens = qkv.shape[0]
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim))


def qkv_prep_ref(qkv: torch.Tensor, q_heads: int, kv_heads: int, positions: torch.Tensor, cos_sin: torch.Tensor,
                 kv_cache: torch.Tensor, slot_mapping: torch.Tensor, q_weight: torch.Tensor | None = None,
                 k_weight: torch.Tensor | None = None, eps: float = 1e-6):
    """The unfused steps with the references: returns (q, k, v) and stores k, v into ``kv_cache``."""
    head_dim = cos_sin.shape[1]
    q, k, v = split_qkv(qkv, q_heads, kv_heads, head_dim)
    if q_weight is not None:
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    q, k = apply_rope_ref(q, k, positions, cos_sin)
    store_kv_ref(k, v.contiguous(), kv_cache, slot_mapping)
    return q, k, v


# ----------------------------------------------------------------------------- kernel
def _build(fp8: bool):
    """The kernel for a cache of the model's dtype or, ``fp8``, of e4m3 bytes (``kernels._fp8``)."""

    def qkv_prep_kernel(qkv, q_out, k_out, q_weight, k_weight, eps, norm, positions, cos_sin, kv_cache,
                        slot_mapping):
        # qkv: (tokens, (q_heads + 2 kv_heads) * d); q_out: (tokens, q_heads, d); k_out: (tokens, kv_heads, d)
        # kv_cache: (blocks, 2, block_size, kv_heads, d) of qkv's dtype, or (fp8) e4m3 bytes as uint8;
        # blockDim.x == d / 2, one block per (token, head)
        partials = cuda.shared.array(WARP, numba.float32)
        pdl_trigger()  # the next kernel may launch; nothing here is read before the previous one has ended
        pdl_wait()
        q_heads, kv_heads, d = q_out.shape[1], k_out.shape[1], q_out.shape[2]
        half = d // 2
        heads = q_heads + kv_heads
        i = cuda.threadIdx.x  # this thread's pair: (i, i + half)
        item = cuda.blockIdx.x
        bs = kv_cache.shape[2]
        s = pow2_shift(bs)  # a KV block's slots: a shift and a mask, not an int64 division (kernels._index)
        while item < positions.size * heads:  # grid-stride; the same for every thread of the block (barriers)
            t = numba.int32(item) // numba.int32(heads)  # 32-bit: a third of the int64 division's instructions
            h = item - t * heads
            is_q = h < q_heads
            out = q_out if is_q else k_out
            head = h if is_q else h - q_heads
            col = h * d  # q's heads, then k's: head h starts at column h * d
            a, b = numba.float32(qkv[t, col + i]), numba.float32(qkv[t, col + i + half])
            if norm:
                total = group_reduce_sum(a * a + b * b, half, partials)
                inv_rms = numba.float32(1.0) / math.sqrt(total / numba.float32(d) + eps)
                w = q_weight if is_q else k_weight
                out[t, head, i] = (a * inv_rms) * numba.float32(w[i])
                out[t, head, i + half] = (b * inv_rms) * numba.float32(w[i + half])
                a, b = numba.float32(out[t, head, i]), numba.float32(out[t, head, i + half])  # rounded, as unfused
            p = positions[t]
            if 0 <= p < cos_sin.shape[0]:
                cos, sin = cos_sin[p, i], cos_sin[p, i + half]
            else:  # outside the table: NaN rather than a read out of bounds (kernels.rope does the same)
                cos = sin = numba.float32(np.nan)
            out[t, head, i] = a * cos - b * sin
            out[t, head, i + half] = b * cos + a * sin
            if not is_q:
                slot = slot_mapping[t]
                if slot >= 0:  # -1: a padding row of a CUDA-graph batch, stored nowhere
                    block, offset = div_pow2(slot, bs, s), mod_pow2(slot, bs, s)
                    v_col = (q_heads + kv_heads) * d + head * d
                    if fp8:  # the key as written to k_out (rounded to the dtype), then to e4m3
                        kv_cache[block, 0, offset, head, i] = e4m3_byte(out[t, head, i])
                        kv_cache[block, 0, offset, head, i + half] = e4m3_byte(out[t, head, i + half])
                        kv_cache[block, 1, offset, head, i] = e4m3_byte(qkv[t, v_col + i])
                        kv_cache[block, 1, offset, head, i + half] = e4m3_byte(qkv[t, v_col + i + half])
                    else:
                        kv_cache[block, 0, offset, head, i] = out[t, head, i]
                        kv_cache[block, 0, offset, head, i + half] = out[t, head, i + half]
                        kv_cache[block, 1, offset, head, i] = qkv[t, v_col + i]
                        kv_cache[block, 1, offset, head, i + half] = qkv[t, v_col + i + half]
            item += cuda.gridDim.x

    if fp8:
        qkv_prep_kernel.__name__ = qkv_prep_kernel.__qualname__ = "qkv_prep_fp8_kernel"
    return mark(cuda.jit(qkv_prep_kernel))


qkv_prep_kernel, qkv_prep_fp8_kernel = _build(False), _build(True)

WARP_PER_HEAD = True  # take the warp-per-head kernel (below) where it fits, for steps of WARP_MIN_TOKENS or more
WARP_MIN_TOKENS = 128  # measured on the H100 (python -m kernels.qkv_prep, bf16, Qwen3-0.6B's heads, µs, block/warp):
#   1 token 3.7/4.3, 64: 4.5/5.0, 128: 6.6/5.5, 512: 16.7/13.2, 4,096: 116.8/91.8
VEC_KERNEL = True  # bf16 steps with head size 128 take the word-wide kernel (_build_vec) at every size
HEADS_PER_BLOCK = 4  # the warp-per-head kernel's warps per block (128 threads), each on its own (token, head)


@cuda.jit(device=True, inline=True)
def _warp_item():
    """A warp-per-head kernel's (lane, warps per block, this warp's first (token, head) item)."""
    warps = cuda.blockDim.x // WARP
    return cuda.threadIdx.x % WARP, warps, cuda.blockIdx.x * warps + cuda.threadIdx.x // WARP


@cuda.jit(device=True, inline=True)
def _token_head(item, heads, q_heads):
    """Item ``item``'s (token, column head, is a query head, head among its kind): 32-bit division (a third of the
    int64 division's instructions)."""
    t = numba.int32(item) // numba.int32(heads)
    h = item - t * heads
    is_q = h < q_heads
    return t, h, is_q, h if is_q else h - q_heads


@functools.cache
def _build_warp(fp8: bool, pairs: int):
    """A warp per (token, head), ``pairs`` pairs ``(i, i + d/2)`` per lane (``d = 64 * pairs``): the norm's sum is
    reduced by shuffles alone (no shared memory, no barrier), and a block holds ``HEADS_PER_BLOCK`` heads, so
    a GPU keeps many more heads in flight than with one 64-thread block per head and a block-wide reduction.
    The lane's values stay in registers between the norm and RoPE; the roundings are the block kernel's."""

    def qkv_prep_warp_kernel(qkv, q_out, k_out, q_weight, k_weight, eps, norm, positions, cos_sin, kv_cache,
                             slot_mapping):
        # the block kernel's arguments; blockDim.x a multiple of 32, d == 64 * pairs
        a = cuda.local.array(pairs, numba.float32)  # the lane's first halves of its pairs, then its second
        b = cuda.local.array(pairs, numba.float32)
        pdl_trigger()
        pdl_wait()
        q_heads, kv_heads, d = q_out.shape[1], k_out.shape[1], q_out.shape[2]
        half = d // 2
        heads = q_heads + kv_heads
        lane, warps, item = _warp_item()
        bs = kv_cache.shape[2]
        s = pow2_shift(bs)
        while item < positions.size * heads:  # a warp's own loop: shuffles within the warp only
            t, h, is_q, head = _token_head(item, heads, q_heads)
            out = q_out if is_q else k_out
            col = h * d
            total = numba.float32(0.0)
            for j in range(pairs):  # unrolled: a and b are indexed by constants, so they are registers
                i = lane + WARP * j
                a[j], b[j] = numba.float32(qkv[t, col + i]), numba.float32(qkv[t, col + i + half])
                total += a[j] * a[j] + b[j] * b[j]
            if norm:
                inv_rms = numba.float32(1.0) / math.sqrt(warp_reduce_sum(total) / numba.float32(d) + eps)
                w = q_weight if is_q else k_weight
                for j in range(pairs):
                    i = lane + WARP * j
                    out[t, head, i] = (a[j] * inv_rms) * numba.float32(w[i])
                    out[t, head, i + half] = (b[j] * inv_rms) * numba.float32(w[i + half])
                    a[j], b[j] = numba.float32(out[t, head, i]), numba.float32(out[t, head, i + half])  # rounded
            p = positions[t]
            inside = 0 <= p < cos_sin.shape[0]
            for j in range(pairs):
                i = lane + WARP * j
                if inside:
                    cos, sin = cos_sin[p, i], cos_sin[p, i + half]
                else:  # outside the table: NaN, as the block kernel
                    cos = sin = numba.float32(np.nan)
                out[t, head, i] = a[j] * cos - b[j] * sin
                out[t, head, i + half] = b[j] * cos + a[j] * sin
            if not is_q:
                slot = slot_mapping[t]
                if slot >= 0:
                    block, offset = div_pow2(slot, bs, s), mod_pow2(slot, bs, s)
                    v_col = (q_heads + kv_heads) * d + head * d
                    for j in range(pairs):
                        for i in (lane + WARP * j, lane + WARP * j + half):
                            if fp8:
                                kv_cache[block, 0, offset, head, i] = e4m3_byte(out[t, head, i])
                                kv_cache[block, 1, offset, head, i] = e4m3_byte(qkv[t, v_col + i])
                            else:
                                kv_cache[block, 0, offset, head, i] = out[t, head, i]
                                kv_cache[block, 1, offset, head, i] = qkv[t, v_col + i]
            item += cuda.gridDim.x * warps

    name = f"qkv_prep_warp{'_fp8' if fp8 else ''}_p{pairs}_kernel"
    qkv_prep_warp_kernel.__name__ = qkv_prep_warp_kernel.__qualname__ = name
    return mark(cuda.jit(qkv_prep_warp_kernel))


@cuda.jit(device=True, inline=True)
def _word(lo, hi):
    """Two fp32 values rounded to bf16 (nearest even) in one int32 word, ``lo`` in the low half."""
    return numba.int32(cvt_pack_bf16(lo, hi))


@functools.cache
def _build_vec(fp8: bool, words: int):
    """bf16 only, a warp per (token, head) like :func:`_build_warp`, but every access is a 4-byte word (two bf16):
    lane ``l`` holds words ``l + 32 m`` (``m < words``, ``d = 128 * words``) of the head's first half, values
    ``(2i, 2i + 1)``, and the same words of its second half, their RoPE partners ``(2i + d/2, 2i + 1 + d/2)``.
    The scalar kernels move 2 bytes an access, and round the norm's result by storing it and reading it back;
    here the rounding is done in registers (``cvt.rn.bf16x2`` and back, the same round-to-nearest-even), and the
    token's position, slot and the norm's weights are loaded before the head, so their latencies overlap."""
    values = 2 * words  # a constant for the compiler: the local arrays' size

    def qkv_prep_vec_kernel(qkv, q_out, k_out, q_weight, k_weight, eps, norm, positions, cos_sin, kv_cache,
                            slot_mapping):
        # qkv: (tokens, (q_heads + 2 kv_heads) * d / 2) int32 words; q_out, k_out: (tokens, heads, d / 2) words;
        # q_weight, k_weight: (d / 2,) words; kv_cache: (blocks, 2, bs, kv_heads, d / 2) words, or (fp8) the
        # (blocks, 2, bs, kv_heads, d) e4m3 bytes as uint8; blockDim.x a multiple of 32, d == 128 * words
        a = cuda.local.array(values, numba.float32)  # first-half values, in registers once unrolled
        b = cuda.local.array(values, numba.float32)  # their partners in the second half
        r = cuda.local.array(4, numba.float32)  # a rotated pair of pairs
        wa = cuda.local.array(words, numba.int32)
        wb = cuda.local.array(words, numba.int32)
        pdl_trigger()
        pdl_wait()
        q_heads, kv_heads, hw = q_out.shape[1], k_out.shape[1], q_out.shape[2] // 2  # hw: words in a half
        d = 4 * hw
        half = 2 * hw
        heads = q_heads + kv_heads
        lane, warps, item = _warp_item()
        bs = kv_cache.shape[2]
        s = pow2_shift(bs)
        while item < positions.size * heads:
            t, h, is_q, head = _token_head(item, heads, q_heads)
            p = positions[t]  # issued first: nothing below waits on the head's words for these
            slot = slot_mapping[t]
            wt = q_weight if is_q else k_weight
            if norm:
                for m in range(words):
                    wa[m], wb[m] = wt[lane + WARP * m], wt[lane + WARP * m + hw]
            col = h * 2 * hw
            total = numba.float32(0.0)
            for m in range(words):
                i = lane + WARP * m
                x, y = qkv[t, col + i], qkv[t, col + i + hw]
                a[2 * m], a[2 * m + 1], b[2 * m], b[2 * m + 1] = bf16_lo(x), bf16_hi(x), bf16_lo(y), bf16_hi(y)
                total += a[2 * m] * a[2 * m] + a[2 * m + 1] * a[2 * m + 1] + b[2 * m] * b[2 * m] \
                    + b[2 * m + 1] * b[2 * m + 1]
            if norm:  # each value times 1/rms times its weight, rounded to bf16 as the unfused kernel stores it
                inv_rms = numba.float32(1.0) / math.sqrt(warp_reduce_sum(total) / numba.float32(d) + eps)
                for m in range(words):
                    x = _word((a[2 * m] * inv_rms) * bf16_lo(wa[m]), (a[2 * m + 1] * inv_rms) * bf16_hi(wa[m]))
                    y = _word((b[2 * m] * inv_rms) * bf16_lo(wb[m]), (b[2 * m + 1] * inv_rms) * bf16_hi(wb[m]))
                    a[2 * m], a[2 * m + 1], b[2 * m], b[2 * m + 1] = bf16_lo(x), bf16_hi(x), bf16_lo(y), bf16_hi(y)
            inside = 0 <= p < cos_sin.shape[0]
            for m in range(words):
                e = 2 * (lane + WARP * m)  # the word's first value: its element index in the first half
                for k in range(2):
                    if inside:
                        cos, sin = cos_sin[p, e + k], cos_sin[p, e + k + half]
                    else:  # outside the table: NaN, as the other kernels
                        cos = sin = numba.float32(np.nan)
                    r[k] = a[2 * m + k] * cos - b[2 * m + k] * sin
                    r[2 + k] = b[2 * m + k] * cos + a[2 * m + k] * sin
                x, y = _word(r[0], r[1]), _word(r[2], r[3])
                i = lane + WARP * m
                if is_q:
                    q_out[t, head, i], q_out[t, head, i + hw] = x, y
                else:
                    k_out[t, head, i], k_out[t, head, i + hw] = x, y
                    if slot >= 0:  # -1: a padding row, stored nowhere
                        block, offset = div_pow2(slot, bs, s), mod_pow2(slot, bs, s)
                        vx, vy = qkv[t, col + kv_heads * 2 * hw + i], qkv[t, col + kv_heads * 2 * hw + i + hw]
                        if fp8:  # the key as rounded to bf16 above, then to e4m3; the value from its bf16
                            for k, word in ((0, x), (half, y)):
                                kv_cache[block, 0, offset, head, e + k] = e4m3_byte(bf16_lo(word))
                                kv_cache[block, 0, offset, head, e + k + 1] = e4m3_byte(bf16_hi(word))
                            for k, word in ((0, vx), (half, vy)):
                                kv_cache[block, 1, offset, head, e + k] = e4m3_byte(bf16_lo(word))
                                kv_cache[block, 1, offset, head, e + k + 1] = e4m3_byte(bf16_hi(word))
                        else:
                            kv_cache[block, 0, offset, head, i], kv_cache[block, 0, offset, head, i + hw] = x, y
                            kv_cache[block, 1, offset, head, i], kv_cache[block, 1, offset, head, i + hw] = vx, vy
            item += cuda.gridDim.x * warps

    name = f"qkv_prep_vec{'_fp8' if fp8 else ''}_w{words}_kernel"
    qkv_prep_vec_kernel.__name__ = qkv_prep_vec_kernel.__qualname__ = name
    return mark(cuda.jit(qkv_prep_vec_kernel))


def vec_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the word-wide kernel takes this step: bf16 at head size 128 (Qwen3's; the kernel is written for any
    multiple of 128, but only 128 is in ``SIGNATURES``, compiled for every GPU by the test suite)."""
    return dtype == torch.bfloat16 and head_dim == 128


def warp_supported(head_dim: int) -> bool:
    """Whether the warp-per-head kernel takes this head size: 64, 128 or 256 (1, 2 or 4 pairs per lane)."""
    return head_dim in (64, 128, 256)


_TYPES = ("float32", "float16", "bfloat16")
SIGNATURES = {
    kernel: [f"void({t}[:, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[::1], {t}[::1], float32, boolean, "
             f"int64[::1], float32[:, ::1], {c or t}[:, :, :, :, ::1], int64[::1])" for t in types]
    for kernel, c, types in ((qkv_prep_kernel, None, _TYPES), (qkv_prep_fp8_kernel, "uint8", ("bfloat16",)))
}
SIGNATURES.update({  # the warp-per-head kernels at the course's head sizes (SmolLM2 64, Qwen3 128)
    _build_warp(fp8, pairs): list(SIGNATURES[qkv_prep_fp8_kernel if fp8 else qkv_prep_kernel])
    for fp8 in (False, True) for pairs in (1, 2)})
_WORDS = ("void(int32[:, ::1], int32[:, :, ::1], int32[:, :, ::1], int32[::1], int32[::1], float32, boolean, "
          "int64[::1], float32[:, ::1], {}[:, :, :, :, ::1], int64[::1])")
SIGNATURES.update({_build_vec(fp8, 1): [_WORDS.format("uint8" if fp8 else "int32")] for fp8 in (False, True)})
SIGNATURES[_word] = ["int32(float32, float32)"]
SIGNATURES[_warp_item] = ["UniTuple(int64, 3)()"]
SIGNATURES[_token_head] = ["Tuple((int32, int64, boolean, int64))(int64, int64, int64)"]


# ----------------------------------------------------------------------------- launcher
def supported(head_dim: int) -> bool:
    """Whether the fused kernel takes this head size: ``d / 2`` a power of two up to 1024."""
    half = head_dim // 2
    return head_dim % 2 == 0 and 0 < half <= 1024 and half & (half - 1) == 0


def qkv_prep(qkv: torch.Tensor, q_heads: int, kv_heads: int, positions: torch.Tensor, cos_sin: torch.Tensor,
             kv_cache: torch.Tensor, slot_mapping: torch.Tensor, q_weight: torch.Tensor | None = None,
             k_weight: torch.Tensor | None = None, eps: float = 1e-6, *, max_blocks: int = 65535,
             warp: bool | None = None, vec: bool | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QK-norm (when weights are given), RoPE and the KV store in one launch.

    qkv: (tokens, (q_heads + 2 kv_heads) * d) contiguous; positions, slot_mapping: (tokens,) int64; cos_sin:
    (max_position, d) float32; kv_cache: one layer's (blocks, 2, block_size, kv_heads, d). Returns q
    (tokens, q_heads, d) and k (tokens, kv_heads, d), new and contiguous, and v, a view of qkv; k and v are
    stored at ``slot_mapping`` (-1: skipped). ``vec``: the word-wide warp-per-head kernel where it fits
    (:func:`vec_supported`); None: ``VEC_KERNEL`` unless ``warp`` is given. ``warp``: the warp-per-head kernel where
    the head size fits it (:func:`warp_supported`); None: ``WARP_PER_HEAD`` for a step of ``WARP_MIN_TOKENS`` or
    more."""
    d = cos_sin.shape[1] if cos_sin.dim() == 2 else -1
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, ndim=2)
    tokens = qkv.shape[0]
    if d <= 0 or qkv.shape[1] != (q_heads + 2 * kv_heads) * d:
        raise ValueError(f"qkv must be (tokens, (q_heads + 2 * kv_heads) * head_dim) = (tokens, "
                         f"{(q_heads + 2 * kv_heads) * max(d, 0)}), got {tuple(qkv.shape)}")
    if not supported(d):
        raise ValueError(f"head_dim {d}: the fused kernel needs head_dim / 2 a power of two up to 1024")
    check_tensor("positions", positions, dtypes=(torch.int64,), shape=(tokens,), device=qkv.device)
    check_tensor("cos_sin", cos_sin, dtypes=(torch.float32,), device=qkv.device)
    check_tensor("kv_cache", kv_cache, dtypes=(qkv.dtype, FP8) if qkv.dtype == torch.bfloat16 else (qkv.dtype,),
                 shape=(None, 2, None, kv_heads, d), device=qkv.device)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(tokens,), device=qkv.device)
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q_weight and k_weight (QK-norm), or neither")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None:
            check_tensor(name, w, dtypes=(qkv.dtype,), shape=(d,), device=qkv.device)
    check_positions(positions, cos_sin.shape[0])
    where = resolve_backend(backend, qkv, positions, cos_sin, kv_cache, slot_mapping)
    if where == "torch":
        return qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, kv_cache, slot_mapping, q_weight, k_weight, eps)
    q = torch.empty(tokens, q_heads, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, kv_heads, d, dtype=qkv.dtype, device=qkv.device)
    v = split_qkv(qkv, q_heads, kv_heads, d)[2]
    if tokens:
        norm = q_weight is not None
        qw, kw = (q_weight, k_weight) if norm else (cos_sin.new_empty(d, dtype=qkv.dtype),) * 2
        fp8 = kv_cache.dtype == FP8
        items = tokens * (q_heads + kv_heads)
        tensors, cache = (qkv, q, k, qw, kw), kv_cache.view(torch.uint8) if fp8 else kv_cache
        use_vec = (VEC_KERNEL and warp is None if vec is None else vec) and vec_supported(qkv.dtype, d)
        if use_vec or (WARP_PER_HEAD and tokens >= WARP_MIN_TOKENS if warp is None else warp) and warp_supported(d):
            per_block = 1 if where == "simulator" else HEADS_PER_BLOCK
            threads, blocks = WARP * per_block, min(-(-items // per_block), 4 if where == "simulator" else max_blocks)
            kernel = _build_vec(fp8, d // 128) if use_vec else _build_warp(fp8, d // 64)
            if use_vec:  # the word-wide kernel reads and writes bf16 pairs as int32 words
                tensors, cache = tuple(x.view(torch.int32) for x in tensors), cache if fp8 else cache.view(torch.int32)
        else:
            kernel, threads = qkv_prep_fp8_kernel if fp8 else qkv_prep_kernel, d // 2
            blocks = min(items, 4 if where == "simulator" else max_blocks)
        launch(kernel, blocks, threads, *tensors, numba.float32(eps), norm, positions, cos_sin, cache, slot_mapping,
               backend=where)
    return q, k, v


def _main() -> None:
    from kernels.rope import rope_cache

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    tokens, q_heads, kv_heads, d = (4096, 16, 8, 128) if on_gpu else (3, 4, 2, 16)
    cos_sin = rope_cache(d, 8192, 1e6, device=device)
    for dtype in FLOAT_DTYPES:
        torch.manual_seed(0)
        qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d, device=device).to(dtype)
        qw, kw = ((1 + 0.1 * torch.randn(d, device=device)).to(dtype) for _ in range(2))
        positions = torch.randint(0, 8192, (tokens,), device=device)
        slots = torch.randperm(tokens * 2, device=device)[:tokens]
        caches = [torch.zeros(tokens * 2 // 16 + 1, 2, 16, kv_heads, d, device=device, dtype=dtype) for _ in range(2)]
        want = qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, caches[0], slots, qw, kw)
        got = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, caches[1], slots, qw, kw)
        pairs = zip((*want[:2], caches[0]), (*got[:2], caches[1]))  # q, k and the cache
        err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
        line = f"{str(dtype)[6:]:9s} {tokens} tokens  max |diff| {err:.3g}"
        if on_gpu:  # the fused kernel against the unfused kernels it replaces (copies included), per call
            from kernels._timing import graph_time
            from kernels.rmsnorm import rms_norm
            from kernels.rope import apply_rope
            from kernels.store_kv import store_kv

            def unfused():
                q, k, v = split_qkv(qkv, q_heads, kv_heads, d)
                q = rms_norm(q.reshape(-1, d).contiguous(), qw).view(tokens, q_heads, d)
                k = rms_norm(k.reshape(-1, d).contiguous(), kw).view(tokens, kv_heads, d)
                apply_rope(q, k, positions, cos_sin)
                store_kv(k, v.contiguous(), caches[0], slots)

            fused_us = graph_time(lambda: qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, caches[1], slots,
                                                   qw, kw, warp=False)).median_us
            unfused_us = graph_time(unfused).median_us
            warp_us = graph_time(lambda: qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, caches[1], slots,
                                                  qw, kw, warp=True)).median_us
            vec_us = (graph_time(lambda: qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, caches[1], slots, qw, kw,
                                                  vec=True)).median_us if vec_supported(dtype, d) else float("nan"))
            sizes = []  # smaller steps (1: a batch-1 decode step, 24 heads): block / warp / word-wide kernel
            for n in (1, 8, 32, 64, 128, 512):
                few = [x[:n] for x in (qkv, positions, slots)]
                kinds = [dict(warp=False), dict(warp=True)] + ([dict(vec=True)] if vec_supported(dtype, d) else [])
                us = [graph_time(lambda k=k: qkv_prep(few[0], q_heads, kv_heads, few[1], cos_sin, caches[1], few[2],
                                                      qw, kw, **k)).median_us for k in kinds]
                sizes.append(f"{n}: " + "/".join(f"{u:.1f}" for u in us))
            moved = qkv.nbytes + 2 * (q_heads + 2 * kv_heads) * d * tokens * qkv.element_size()  # read + q, k, cache
            line += (f"  fused {fused_us:7.1f} us ({moved / fused_us / 1e3:5.0f} GB/s)  unfused kernels "
                     f"{unfused_us:7.1f} us  warp per head {warp_us:7.1f} us  word-wide {vec_us:7.1f} us | tokens: "
                     "block/warp/word-wide us "
                     + ", ".join(sizes))
        print(line)


if __name__ == "__main__":
    _main()
