"""Prefill attention on tensor cores: the flash-attention algorithm with ``mma.sync`` from numba (sm_80+).

``kernels.flash_attention`` computes every product as a scalar fp32 FMA, one query row per thread. A GPU's
tensor cores multiply small matrix tiles instead: one ``mma.sync.m16n8k16`` instruction, issued by a whole
warp, is a (16 x 16) @ (16 x 8) product of bf16 or fp16 values accumulated in fp32 -- 2,048 multiply-adds in
one instruction. numba-cuda has no API for them, so ``kernels._mma`` emits the instruction (and the packing of
two floats into one bf16x2 word) as inline PTX from numba intrinsics: no call, no link step, registers only.

The algorithm is the same online softmax as ``kernels.flash_attention``; the work is cut differently:

* a block of 4 warps owns 64 query rows of one head; each warp owns 16 of them;
* the warp's queries sit in registers as mma *A fragments* for the whole kernel (each lane holds pieces of
  rows ``g`` and ``g + 8``, ``g = lane // 4``: the layout the instruction fixes);
* the block walks the keys in tiles of 64: it copies the tile's K (row-major) and V (transposed, so that
  consecutive keys pack into one 32-bit word) into shared memory, padded so the fragment loads hit 32 banks;
* per tile each warp computes its 16 x 64 scores S = Q K^T (8 x head_dim/16 mma), masks them, updates its
  running max and sums (4 lanes share a row: two shuffles), and accumulates P V (4 x head_dim/8 mma), where P
  is the score fragment itself rounded to bf16/fp16: an mma's output layout is the next one's input layout;
* the lane's shared-memory fragment addresses are re-derived in every tile from ``kernels._mma.opaque``: left
  to itself, the compiler hoists all of them out of the key loop (for head_dim 128: 256 addresses of 64 bits,
  held across the loop) and ptxas spills to local memory -- 1,288 bytes per thread and 320 spill loads in the
  loop, in the previous version's sm_90 machine code. Now: 225 registers, no spills (``python -m kernels._ptx``).

Values move as raw bits: the launcher views q and the output as ``int32`` words (a pair of bf16/fp16 values
each) and k, v as 16-byte ``complex128`` chunks (8 values, one ``LDG.E.128`` load; ``kernels._vec16``).
Limits, honestly: bf16/fp16 only, head_dim 64 or 128, causal (end-aligned) or not; each kv head's tile is
loaded once per query head. By default a tile is loaded, then computed: the copy does not overlap the math.
``pipelined=True`` (``PIPELINED``) takes FlashAttention-2's layout instead (``_build_pipelined``): K and V copied
to shared memory by ``cp.async`` without passing through registers, the next K tile's copy in flight during this
tile's softmax and P V, the next V's during the next S = Q K^T, and the B fragments read with ``ldmatrix`` (V
transposed by ``ldmatrix.trans``, so it stays row-major). It passes the same checks; it is not yet timed on a
GPU, hence not the default. Checked three ways: in numba's CUDA simulator on
tiny shapes (``kernels._mma``'s stand-ins compute the instruction from its documented fragment layout), compiled
and linked for every supported GPU on any machine, with its sm_90 machine code read back (``kernels._ptx``), and
on a GPU against SDPA in fp32 (``tests/test_17_flash_mma.py``).
``python -m kernels.flash_attention_mma`` checks it and times it against PyTorch's SDPA.
"""

import math

import numba
import torch
from numba import cuda

from kernels._checks import check_tensor
from kernels._launch import cdiv, launch, resolve_backend
from kernels._mma import (cp_async16, cp_async_commit, cp_async_wait0, cp_async_wait1, ldmatrix_x4, ldmatrix_x4_trans,
                          mma_bf16, mma_f16, opaque, pack_bf16, pack_f16)
from kernels._vec16 import aligned16, load_words
from kernels.flash_attention import flash_attention_ref

HEAD_DIMS = (64, 128)
WARPS = 8  # warps per block, 16 query rows each (read at call time; the simulator tests use 1: fewer threads).
#   Measured on an H100 (pipelined, head_dim 128, heavy-first): 8 warps are 1.11-1.20x faster than 4 at 1k-16k
#   tokens -- one K/V tile in shared memory serves 128 query rows instead of 64 -- at the same 8 warps per SM
PIPELINED = True  # the default kernel: True, the FlashAttention-2 layout of _build_pipelined (cp.async + ldmatrix);
#   False, load-then-compute. Measured on an H100 (bench/results/07_attention.json): the pipelined kernel
#   is 1.4-2.0x faster, 0.59 vs 1.10 ms at 4,096 tokens and 7.4 vs 13.1 ms at 16,384 (bf16, head_dim 128)
TILE = 64  # keys per shared-memory tile
PAD = 4  # extra 32-bit words per shared row: rows start 4 banks apart, so a fragment load is conflict-free
LOG2E = 1.4426950408889634


def supported(q: torch.Tensor) -> bool:
    """Whether the tensor-core kernel takes these queries: bf16/fp16 on an sm_80+ GPU, head_dim 64 or 128."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in HEAD_DIMS
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


@cuda.jit(device=True, inline=True)
def _transpose_pair(vt, d, pair, a, b):
    """Words ``a`` (key 2p: elements d, d+1) and ``b`` (key 2p+1: the same elements) -> vt[d, p], vt[d+1, p]."""
    a, b = numba.uint32(a), numba.uint32(b)
    vt[d, pair] = (a & numba.uint32(0xFFFF)) | (b << numba.uint32(16))
    vt[d + 1, pair] = (a >> numba.uint32(16)) | (b & numba.uint32(0xFFFF0000))


@cuda.jit(device=True, inline=True)
def _load_q(qa, q, q_start, row0, row1, q_len, head, t, ksteps):
    """The warp's Q as mma A fragments: this lane's rows ``row0`` and ``row1`` (= row0 + 8), words ``8 kk + t`` and
    ``8 kk + 4 + t`` of each 16-column step ``kk``; zeros past the sequence."""
    for kk in range(ksteps):
        for h in range(2):
            w = kk * 8 + 4 * h + t
            qa[4 * kk + 2 * h] = numba.uint32(q[q_start + row0, head, w]) if row0 < q_len else numba.uint32(0)
            qa[4 * kk + 2 * h + 1] = numba.uint32(q[q_start + row1, head, w]) if row1 < q_len else numba.uint32(0)


@cuda.jit(device=True, inline=True)
def _inverse_row_sums(l0, l1):
    """1 / each row's softmax sum, from the parts its 4 lanes hold (0 for a row that saw no key)."""
    for lanes in (1, 2):
        l0 += cuda.shfl_xor_sync(0xFFFFFFFF, l0, lanes)
        l1 += cuda.shfl_xor_sync(0xFFFFFFFF, l1, lanes)
    return (numba.float32(1.0) / l0 if l0 > 0 else numba.float32(0.0),
            numba.float32(1.0) / l1 if l1 > 0 else numba.float32(0.0))


@cuda.jit(device=True, inline=True)
def _online_softmax(s, o, m0, m1, l0, l1, n_tiles):
    """One key tile's online-softmax step for a lane's two rows (row0: ``s[4j]``, ``s[4j + 1]``; row1: ``s[4j + 2]``,
    ``s[4j + 3]``; scores in log2 units): the scores become probabilities in place, the output accumulators ``o``
    (``n_tiles`` 8-column tiles) are rescaled, and the new running max and sum ``(m0, m1, l0, l1)`` returned."""
    mx0 = mx1 = numba.float32(-math.inf)
    for j in range(TILE // 8):
        mx0 = max(mx0, max(s[4 * j], s[4 * j + 1]))
        mx1 = max(mx1, max(s[4 * j + 2], s[4 * j + 3]))
    for lanes in (1, 2):  # the 4 lanes of a row agree on its max
        mx0 = max(mx0, cuda.shfl_xor_sync(0xFFFFFFFF, mx0, lanes))
        mx1 = max(mx1, cuda.shfl_xor_sync(0xFFFFFFFF, mx1, lanes))
    new0, new1 = max(m0, mx0), max(m1, mx1)
    # NOTE: a row that has seen no key yet keeps max -inf: subtract 0 instead (exp2(-inf) = 0, no NaN)
    base0 = new0 if new0 != -math.inf else numba.float32(0.0)
    base1 = new1 if new1 != -math.inf else numba.float32(0.0)
    alpha0, alpha1 = math.exp2(m0 - base0), math.exp2(m1 - base1)
    l0 *= alpha0
    l1 *= alpha1
    for n in range(n_tiles):
        o[4 * n] *= alpha0
        o[4 * n + 1] *= alpha0
        o[4 * n + 2] *= alpha1
        o[4 * n + 3] *= alpha1
    for j in range(TILE // 8):
        s[4 * j] = math.exp2(s[4 * j] - base0)
        s[4 * j + 1] = math.exp2(s[4 * j + 1] - base0)
        s[4 * j + 2] = math.exp2(s[4 * j + 2] - base1)
        s[4 * j + 3] = math.exp2(s[4 * j + 3] - base1)
        l0 += s[4 * j] + s[4 * j + 1]
        l1 += s[4 * j + 2] + s[4 * j + 3]
    return new0, new1, l0, l1


def _build(mma, pack, head_dim: int, name: str, warps: int = 4):
    """The kernel for one (dtype, head_dim): the sizes are constants, so the loops unroll into registers."""
    W = head_dim // 2  # 32-bit words per row
    C = head_dim // 8  # 16-byte chunks per row
    THREADS = 32 * warps
    ROWS = 16 * warps  # query rows per block
    KSTEPS = head_dim // 16  # mma steps over head_dim for S = Q K^T
    NTILES = head_dim // 8  # 8-column output tiles of P V
    KS, VT = (TILE, W + PAD), (head_dim, TILE // 2 + PAD)  # shared-memory shapes (constants for numba)
    QA, S, O = 4 * KSTEPS, 4 * (TILE // 8), 4 * NTILES  # register arrays

    def kernel(q, k, v, out, cu_seqlens_q, cu_seqlens_k, scale_log2, causal):
        # q, out: (total_q, q_heads, W) int32 words; k, v: (total_k, kv_heads, C) 16-byte chunks (complex128);
        # grid (q tiles, q_heads, batch), 4 warps per block
        ks = cuda.shared.array(KS, numba.uint32)  # K tile, row-major: ks[key, word]
        vt = cuda.shared.array(VT, numba.uint32)  # V tile transposed: vt[d, key pair]
        qa = cuda.local.array(QA, numba.uint32)  # the warp's Q as A fragments
        s = cuda.local.array(S, numba.float32)  # scores of one tile: 8 n-tiles x 4 values
        o = cuda.local.array(O, numba.float32)  # the output accumulators
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        g, t = lane // 4, lane % 4
        head, seq = cuda.blockIdx.y, cuda.blockIdx.z
        kv_head = head // (q.shape[1] // k.shape[1])
        q_start, k_start = cu_seqlens_q[seq], cu_seqlens_k[seq]
        q_len, k_len = cu_seqlens_q[seq + 1] - q_start, cu_seqlens_k[seq + 1] - k_start
        first = cuda.blockIdx.x * ROWS
        if first >= q_len:
            return  # the whole block leaves before any barrier
        offset = k_len - q_len  # end-aligned causal mask: row r sees keys <= r + offset
        row0 = first + warp * 16 + g  # this lane's two rows: row0 and row0 + 8
        row1 = row0 + 8
        _load_q(qa, q, q_start, row0, row1, q_len, head, t, KSTEPS)  # Q fragments, rows g / g + 8
        for i in range(O):
            o[i] = numba.float32(0.0)
        m0 = m1 = numba.float32(-math.inf)  # running max (log2 units) of row0 / row1
        l0 = l1 = numba.float32(0.0)  # this lane's part of the running sums
        end = k_len
        if causal:
            end = min(k_len, min(first + ROWS, q_len) + offset)  # keys any row of the block sees
        for tile in range(0, end, TILE):
            for i in range(tid, TILE * C, THREADS):  # K tile: 16-byte loads, consecutive lanes along a row
                key, c = i // C, i % C
                w0 = w1 = w2 = w3 = numba.int32(0)
                if tile + key < k_len:
                    w0, w1, w2, w3 = load_words(k[k_start + tile + key, kv_head], c)
                ks[key, 4 * c] = numba.uint32(w0)
                ks[key, 4 * c + 1] = numba.uint32(w1)
                ks[key, 4 * c + 2] = numba.uint32(w2)
                ks[key, 4 * c + 3] = numba.uint32(w3)
            for i in range(tid, (TILE // 2) * C, THREADS):  # V tile, transposed: two keys per word
                pair, c = i % (TILE // 2), i // (TILE // 2)  # NOTE: lanes along keys: conflict-free stores
                key = tile + 2 * pair
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = numba.int32(0)
                if key < k_len:
                    a0, a1, a2, a3 = load_words(v[k_start + key, kv_head], c)
                if key + 1 < k_len:
                    b0, b1, b2, b3 = load_words(v[k_start + key + 1, kv_head], c)
                _transpose_pair(vt, 8 * c, pair, a0, b0)
                _transpose_pair(vt, 8 * c + 2, pair, a1, b1)
                _transpose_pair(vt, 8 * c + 4, pair, a2, b2)
                _transpose_pair(vt, 8 * c + 6, pair, a3, b3)
            cuda.syncthreads()
            gl, tl = opaque(g), opaque(t)  # g and t, re-derived per tile: the fragment addresses are not hoisted
            # S = Q K^T: n-tile j holds keys tile + 8j .. + 7; this lane's values: (row0, keys 2t, 2t+1), (row1, same)
            for j in range(TILE // 8):
                c0 = c1 = c2 = c3 = numba.float32(0.0)
                for kk in range(KSTEPS):
                    c0, c1, c2, c3 = mma(qa[4 * kk], qa[4 * kk + 1], qa[4 * kk + 2], qa[4 * kk + 3],
                                         ks[8 * j + gl, kk * 8 + tl], ks[8 * j + gl, kk * 8 + 4 + tl], c0, c1, c2, c3)
                key = tile + 8 * j + 2 * t
                lim0 = min(k_len, row0 + offset + 1) if causal else k_len  # keys < lim are seen
                lim1 = min(k_len, row1 + offset + 1) if causal else k_len
                s[4 * j] = c0 * scale_log2 if key < lim0 else numba.float32(-math.inf)
                s[4 * j + 1] = c1 * scale_log2 if key + 1 < lim0 else numba.float32(-math.inf)
                s[4 * j + 2] = c2 * scale_log2 if key < lim1 else numba.float32(-math.inf)
                s[4 * j + 3] = c3 * scale_log2 if key + 1 < lim1 else numba.float32(-math.inf)
            m0, m1, l0, l1 = _online_softmax(s, o, m0, m1, l0, l1, NTILES)
            # O += P V, 16 keys per step: P's A fragment is two score n-tiles, rounded to the input type
            for kk in range(TILE // 16):
                a0 = pack(s[8 * kk], s[8 * kk + 1])
                a1 = pack(s[8 * kk + 2], s[8 * kk + 3])
                a2 = pack(s[8 * kk + 4], s[8 * kk + 5])
                a3 = pack(s[8 * kk + 6], s[8 * kk + 7])
                for n in range(NTILES):
                    d = 8 * n + gl
                    o[4 * n], o[4 * n + 1], o[4 * n + 2], o[4 * n + 3] = mma(
                        a0, a1, a2, a3, vt[d, kk * 8 + tl], vt[d, kk * 8 + 4 + tl],
                        o[4 * n], o[4 * n + 1], o[4 * n + 2], o[4 * n + 3])
            cuda.syncthreads()  # every warp is done with the tile before the next one overwrites it
        inv0, inv1 = _inverse_row_sums(l0, l1)
        for n in range(NTILES):  # columns 8n + 2t, 8n + 2t + 1: word 4n + t
            if row0 < q_len:
                out[q_start + row0, head, 4 * n + t] = numba.int32(pack(o[4 * n] * inv0, o[4 * n + 1] * inv0))
            if row1 < q_len:
                out[q_start + row1, head, 4 * n + t] = numba.int32(pack(o[4 * n + 2] * inv1, o[4 * n + 3] * inv1))

    kernel.__name__ = kernel.__qualname__ = name
    return cuda.jit(kernel)


@cuda.jit(device=True, inline=True)
def _copy_tile(words, src, first, tile, k_len, kv_head, tid, threads, chunks, stride):
    """Issue the asynchronous copies of keys ``tile .. tile + TILE - 1`` (of a sequence whose keys start at row
    ``first`` of ``src``) into the shared ``words``, row-major, ``stride`` words a row; this thread's share:
    chunks ``tid, tid + threads, ...`` of the tile. A key past ``k_len`` is written as zeros."""
    for i in range(opaque(tid), TILE * chunks, threads):  # opaque: the addresses are not hoisted out of the key loop
        key, c = i // chunks, i % chunks
        row = tile + key
        cp_async16(words, key * stride + 4 * c, src[first + min(row, k_len - 1), kv_head], c,
                   16 if row < k_len else 0)


def _build_pipelined(mma, pack, head_dim: int, name: str, warps: int = 4, heavy_first: bool = True):
    """The kernel of ``_build`` laid out as FlashAttention-2: K and V tiles copied global -> shared with
    ``cp.async`` (no registers, no waiting at the copy), the next tile's K copied while this tile's softmax and
    P V run and the next V while the next S = Q K^T runs, and the mma B fragments loaded with ``ldmatrix``
    (V's transposed on the fly by ``ldmatrix.trans``: V stays row-major in shared memory, as K does).
    ``heavy_first``: block x takes the query tiles from the last one down. Under a causal mask the last tiles see
    the most keys; started first, they no longer finish alone at the end of the grid."""
    W = head_dim // 2  # 32-bit words per row
    C = head_dim // 8  # 16-byte chunks per row
    THREADS = 32 * warps
    ROWS = 16 * warps
    KSTEPS = head_dim // 16
    NTILES = head_dim // 8
    STRIDE = W + PAD  # words per shared row: 16-byte aligned rows, 8 rows of an ldmatrix in 32 different banks
    SIZE = TILE * STRIDE
    QA, S, O = 4 * KSTEPS, 4 * (TILE // 8), 4 * NTILES

    def kernel(q, k, v, out, cu_seqlens_q, cu_seqlens_k, scale_log2, causal):
        ks = cuda.shared.array(SIZE, numba.uint32)  # K tile, row-major: ks[key * STRIDE + word]
        vs = cuda.shared.array(SIZE, numba.uint32)  # V tile, row-major as well
        qa = cuda.local.array(QA, numba.uint32)
        s = cuda.local.array(S, numba.float32)
        o = cuda.local.array(O, numba.float32)
        tid = cuda.threadIdx.x
        warp, lane = tid // 32, tid % 32
        g, t = lane // 4, lane % 4
        head, seq = cuda.blockIdx.y, cuda.blockIdx.z
        kv_head = head // (q.shape[1] // k.shape[1])
        q_start, k_start = cu_seqlens_q[seq], cu_seqlens_k[seq]
        q_len, k_len = cu_seqlens_q[seq + 1] - q_start, cu_seqlens_k[seq + 1] - k_start
        first = ((cuda.gridDim.x - 1 - cuda.blockIdx.x) if heavy_first else cuda.blockIdx.x) * ROWS
        if first >= q_len:
            return
        offset = k_len - q_len
        row0 = first + warp * 16 + g
        row1 = row0 + 8
        _load_q(qa, q, q_start, row0, row1, q_len, head, t, KSTEPS)
        for i in range(O):
            o[i] = numba.float32(0.0)
        m0 = m1 = numba.float32(-math.inf)
        l0 = l1 = numba.float32(0.0)
        end = k_len
        if causal:
            end = min(k_len, min(first + ROWS, q_len) + offset)
        if end > 0:  # the first tile's K, then its V: two groups of copies in flight
            _copy_tile(ks, k, k_start, 0, k_len, kv_head, tid, THREADS, C, STRIDE)
            cp_async_commit()
            _copy_tile(vs, v, k_start, 0, k_len, kv_head, tid, THREADS, C, STRIDE)
            cp_async_commit()
        for tile in range(0, end, TILE):
            cp_async_wait1()  # this thread's copies of K are done (V's may not be)...
            cuda.syncthreads()  # ...and everyone's
            # lane l gives ldmatrix the row l % 8 of matrix l // 8; re-derived per tile (kernels._mma.opaque)
            kl = opaque((lane % 8) * STRIDE + 4 * (lane // 8))
            for j in range(TILE // 8):  # S = Q K^T, n-tile j: keys tile + 8j .. + 7
                c0 = c1 = c2 = c3 = numba.float32(0.0)
                for kk in range(0, KSTEPS, 2):  # one ldmatrix.x4: the B fragments of two k-steps
                    b0, b1, b2, b3 = ldmatrix_x4(ks, kl + 8 * j * STRIDE + 8 * kk)
                    c0, c1, c2, c3 = mma(qa[4 * kk], qa[4 * kk + 1], qa[4 * kk + 2], qa[4 * kk + 3], b0, b1,
                                         c0, c1, c2, c3)
                    c0, c1, c2, c3 = mma(qa[4 * kk + 4], qa[4 * kk + 5], qa[4 * kk + 6], qa[4 * kk + 7], b2, b3,
                                         c0, c1, c2, c3)
                key = tile + 8 * j + 2 * t
                lim0 = min(k_len, row0 + offset + 1) if causal else k_len
                lim1 = min(k_len, row1 + offset + 1) if causal else k_len
                s[4 * j] = c0 * scale_log2 if key < lim0 else numba.float32(-math.inf)
                s[4 * j + 1] = c1 * scale_log2 if key + 1 < lim0 else numba.float32(-math.inf)
                s[4 * j + 2] = c2 * scale_log2 if key < lim1 else numba.float32(-math.inf)
                s[4 * j + 3] = c3 * scale_log2 if key + 1 < lim1 else numba.float32(-math.inf)
            cuda.syncthreads()  # every warp is done with this K tile: the next one may land in it
            if tile + TILE < end:
                _copy_tile(ks, k, k_start, tile + TILE, k_len, kv_head, tid, THREADS, C, STRIDE)
            cp_async_commit()  # (an empty group at the last tile: the waits count groups)
            m0, m1, l0, l1 = _online_softmax(s, o, m0, m1, l0, l1, NTILES)
            cp_async_wait1()  # this tile's V is done (the next K may not be)
            cuda.syncthreads()
            # ldmatrix.trans: lane l gives row l % 8 of matrix l // 8, matrices (keys +0 / +8) x (columns +0 / +8)
            vl = opaque((lane % 8 + 8 * ((lane // 8) % 2)) * STRIDE + 4 * (lane // 16))
            for kk in range(TILE // 16):  # O += P V, keys tile + 16 kk .. + 15
                a0 = pack(s[8 * kk], s[8 * kk + 1])
                a1 = pack(s[8 * kk + 2], s[8 * kk + 3])
                a2 = pack(s[8 * kk + 4], s[8 * kk + 5])
                a3 = pack(s[8 * kk + 6], s[8 * kk + 7])
                for n in range(0, NTILES, 2):  # one ldmatrix.x4.trans: the B fragments of output tiles n, n + 1
                    b0, b1, b2, b3 = ldmatrix_x4_trans(vs, vl + 16 * kk * STRIDE + 4 * n)
                    o[4 * n], o[4 * n + 1], o[4 * n + 2], o[4 * n + 3] = mma(
                        a0, a1, a2, a3, b0, b1, o[4 * n], o[4 * n + 1], o[4 * n + 2], o[4 * n + 3])
                    o[4 * n + 4], o[4 * n + 5], o[4 * n + 6], o[4 * n + 7] = mma(
                        a0, a1, a2, a3, b2, b3, o[4 * n + 4], o[4 * n + 5], o[4 * n + 6], o[4 * n + 7])
            cuda.syncthreads()  # every warp is done with this V tile
            if tile + TILE < end:
                _copy_tile(vs, v, k_start, tile + TILE, k_len, kv_head, tid, THREADS, C, STRIDE)
            cp_async_commit()
        cp_async_wait0()
        inv0, inv1 = _inverse_row_sums(l0, l1)
        for n in range(NTILES):
            if row0 < q_len:
                out[q_start + row0, head, 4 * n + t] = numba.int32(pack(o[4 * n] * inv0, o[4 * n + 1] * inv0))
            if row1 < q_len:
                out[q_start + row1, head, 4 * n + t] = numba.int32(pack(o[4 * n + 2] * inv1, o[4 * n + 3] * inv1))

    kernel.__name__ = kernel.__qualname__ = name
    return cuda.jit(kernel)


flash_mma_bf16_64 = _build(mma_bf16, pack_bf16, 64, "flash_mma_bf16_64")
flash_mma_bf16_128 = _build(mma_bf16, pack_bf16, 128, "flash_mma_bf16_128")
flash_mma_f16_64 = _build(mma_f16, pack_f16, 64, "flash_mma_f16_64")
flash_mma_f16_128 = _build(mma_f16, pack_f16, 128, "flash_mma_f16_128")
flash_mma_async_bf16_64 = _build_pipelined(mma_bf16, pack_bf16, 64, f"flash_mma_async_bf16_64_w{WARPS}", WARPS)
flash_mma_async_bf16_128 = _build_pipelined(mma_bf16, pack_bf16, 128, f"flash_mma_async_bf16_128_w{WARPS}", WARPS)
_VARIANTS = {torch.bfloat16: (mma_bf16, pack_bf16, "bf16"), torch.float16: (mma_f16, pack_f16, "f16")}
KERNELS = {(torch.bfloat16, 64, False, 4): flash_mma_bf16_64, (torch.bfloat16, 128, False, 4): flash_mma_bf16_128,
           (torch.float16, 64, False, 4): flash_mma_f16_64, (torch.float16, 128, False, 4): flash_mma_f16_128,
           (torch.bfloat16, 64, True, WARPS): flash_mma_async_bf16_64,
           (torch.bfloat16, 128, True, WARPS): flash_mma_async_bf16_128}
_SIG = "void(int32[:, :, ::1], complex128[:, :, ::1], complex128[:, :, ::1], int32[:, :, ::1], int32[::1], " \
       "int32[::1], float32, boolean)"
SIGNATURES = {kernel: [_SIG] for kernel in KERNELS.values()} | {
    _transpose_pair: ["void(uint32[:, ::1], int64, int64, int32, int32)"],
    _online_softmax: ["UniTuple(float32, 4)(float32[::1], float32[::1], float32, float32, float32, float32, int64)"],
    _load_q: ["void(uint32[::1], int32[:, :, ::1], int32, int64, int64, int32, int32, int64, int64)"],
    _inverse_row_sums: ["UniTuple(float32, 2)(float32, float32)"],
    _copy_tile: ["void(uint32[::1], complex128[:, :, ::1], int32, int64, int64, int64, int32, int64, int64, int64)"]}


def _kernel(dtype: torch.dtype, head_dim: int, warps: int, pipelined: bool):
    """The kernel for these constants: one of those above, or else built on first use."""
    key = (dtype, head_dim, pipelined, warps)
    if key not in KERNELS:
        mma, pack, name = _VARIANTS[dtype]
        build = _build_pipelined if pipelined else _build
        KERNELS[key] = build(mma, pack, head_dim, f"flash_mma_{'async_' * pipelined}{name}_{head_dim}_w{warps}",
                             warps)
    return KERNELS[key]


def flash_attention_mma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = None, scale: float | None = None,
                        causal: bool = True, out: torch.Tensor | None = None,
                        pipelined: bool | None = None) -> torch.Tensor:
    """Like ``kernels.flash_attention.flash_attention`` (packed varlen, GQA, end-aligned causal), on tensor cores.
    ``pipelined``: the FlashAttention-2 layout (``cp.async`` copies overlapping the math, ``ldmatrix``); None:
    the module's ``PIPELINED``.

    q: (total_q, q_heads, d); k, v: (total_k, kv_heads, d), bf16 or fp16, contiguous; cu_seqlens_q/_k: int32
    (batch + 1,) on the GPU. ``max_seqlen_q`` (the longest query run) sizes the grid; without it the launcher
    reads ``cu_seqlens_q`` back (a device sync). No other checks read the device: the engine calls this once
    per layer.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    check_tensor("q", q, dtypes=(torch.bfloat16, torch.float16), ndim=3)
    check_tensor("k", k, dtypes=(q.dtype,), shape=(None, None, q.shape[2]), device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), shape=tuple(k.shape), device=q.device)
    if q.shape[2] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {q.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({k.shape[1]})")
    where = resolve_backend("auto", q, k, v, cu_seqlens_q, cu_seqlens_k)
    if where == "torch":
        raise RuntimeError("flash_attention_mma runs on a GPU (sm_80+), or in numba's CUDA simulator (tiny shapes: "
                           "set NUMBA_ENABLE_CUDASIM=1 before numba is imported)")
    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    scale = q.shape[2] ** -0.5 if scale is None else scale
    k, v = (x if aligned16(x) else x.clone() for x in (k, v))  # NOTE: 16-byte loads need alignment
    # q and out as 32-bit words (pairs of 16-bit values), k and v as 16-byte chunks (8 values)
    args = (q.view(torch.int32), k.view(torch.complex128), v.view(torch.complex128), out.view(torch.int32))
    warps = WARPS
    pipelined = PIPELINED if pipelined is None else pipelined
    grid = (cdiv(max_seqlen_q, 16 * warps), q.shape[1], cu_seqlens_q.shape[0] - 1)
    launch(_kernel(q.dtype, q.shape[2], warps, pipelined), grid, 32 * warps, *args, cu_seqlens_q, cu_seqlens_k,
           numba.float32(scale * LOG2E), bool(causal), backend=where)
    return out


def _main() -> None:
    import torch.nn.functional as F

    from kernels._timing import bench

    if not torch.cuda.is_available():
        print("needs a GPU (sm_80+); on a CPU, python -m kernels._ptx compiles and links the kernels")
        return
    heads, kv_heads, d = 16, 8, 128
    for n in (1024, 4096, 16384):
        for dtype in (torch.bfloat16, torch.float16):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(n, heads, d, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(n, kv_heads, d, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(n, kv_heads, d, device="cuda", dtype=dtype, generator=g)
            cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            ours = flash_attention_mma(q, k, v, cu, cu, max_seqlen_q=n)
            ref = flash_attention_ref(q, k, v, cu, cu)
            err = (ours.float() - ref.float()).abs().max().item()
            qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
            piped = flash_attention_mma(q, k, v, cu, cu, max_seqlen_q=n, pipelined=True)
            err_piped = (piped.float() - ref.float()).abs().max().item()
            t_ours = bench(lambda: flash_attention_mma(q, k, v, cu, cu, max_seqlen_q=n, pipelined=False)).median_us
            t_piped = bench(lambda: flash_attention_mma(q, k, v, cu, cu, max_seqlen_q=n, pipelined=True)).median_us
            t_sdpa = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                           ).median_us
            flops = 4 * n * n / 2 * d * heads  # causal: half the score matrix, two matmuls
            print(f"{n:6d} tokens {str(dtype)[6:]:9s} max |err| {err:.1e} / {err_piped:.1e}  ours {t_ours:9.1f} us "
                  f"({flops / t_ours / 1e6:6.1f} TFLOP/s)  pipelined {t_piped:9.1f} us "
                  f"({flops / t_piped / 1e6:6.1f} TFLOP/s)  SDPA {t_sdpa:8.1f} us  ratio {t_sdpa / t_ours:.3f} / "
                  f"{t_sdpa / t_piped:.3f}")


if __name__ == "__main__":
    _main()
