"""Decode attention that prepares its own inputs: QK-norm, RoPE and the KV store inside the attention kernel.

A decode step's attention layer runs two kernels after its ``qkv_proj`` matmul: ``kernels.qkv_prep`` (each head
normalized and rotated, this token's key and value stored in the paged cache) and the paged decode attention
(``kernels.paged_attention_warp``), which reads the prepared queries back. At batch 1 neither has much to do: the
prep moves ~12 KB, the attention a few hundred keys. What each costs is its chain of memory round trips after it
waits for the kernel before it (``kernels._pdl``): the prep reads qkv, writes q, and ends; the attention can only
then read q. Here one kernel does both, and the prepared queries never leave the registers:

* every block (KV head, sequence, split) prepares the ``group`` query heads of its KV head itself, straight from
  the projection's output: a row of 16 lanes holds a head (8 bf16 values a lane, one 16-byte load), the norm's
  sum is a shuffle reduction over the row, and RoPE's partner of element ``i`` (``i + 64``) is in the lane 8
  places away (``shfl_xor 8``). Splits of the same head repeat this work: a few hundred instructions, no memory
  traffic beyond the head's 256 bytes (cached);
* the block whose split holds the sequence's last key (this step's token) prepares the key, stores it and the
  value into the cache, and makes them visible to its own warps with the barrier every block passes before its
  first trip; no other block reads that key.

The roundings are the unfused kernels' (the norm's result rounded to bf16, then RoPE's); the kernel is built with
``fastmath`` like the attention kernel, so the norm's square root and division are the GPU's approximate ones and a
stored key can differ from ``qkv_prep``'s in its last bit. The trip over the cache is
``kernels.paged_attention_warp``'s 16-byte bf16 trip (:func:`~kernels.paged_attention_warp._bf16_trip`), split-K
with the fused merge as there.

``early`` (``EARLY``) goes one step further with programmatic dependent launch: everything no kernel of the step
writes (the step's inputs, the first trip's cache blocks and keys and values, all from earlier steps) is read before
``pdl_wait``, while the previous kernel is still running; only the projection's output waits. The new token's slot
is read then too, before it is written, and its key and value go into the registers of the lane group that scores
it from the values just prepared.

Limits: bf16, head size 128, a bf16 cache; a decode step only (one new token per sequence, the last of its
context); positions outside the RoPE table give NaN. ``python -m kernels.paged_decode_prep`` checks it against the
two kernels it replaces.
"""

import functools
import math

import numba
import numpy as np
import torch
from numba import cuda

from kernels._checks import check_tensor
from kernels._index import div_pow2, mod_pow2, pow2_shift
from kernels._launch import cdiv, launch, resolve_backend
from kernels._pdl import mark, pdl_trigger, pdl_wait
from kernels._vec16 import aligned16, bf16_hi, bf16_lo, load_words, store_words
from kernels.paged_attention import paged_attention_ref, split_buffers
from kernels.paged_attention_warp import (FULL_MASK, NEG_INF, UNROLL16, WARPS, _bf16_trip, _counters, _finish,
                                          _split_keys, _trip_reads, fit_warps, plan_splits)
from kernels.qkv_prep import _word, qkv_prep_ref

DIM = 128  # the head size the kernel is written for: 16 lanes of 8 bf16 values
LPR = DIM // 8  # lanes per head row
EARLY = False  # the kernel reads what no kernel of this step writes before it waits for the previous kernel
#   (kernels._pdl): the step's inputs (context lengths, positions, slots, block tables: copied or computed before the
#   step's first PDL kernel, which no later kernel launches ahead of) and the first trip's keys and values (written
#   by earlier steps; the new token's slot is read too, stale, and replaced from registers). Measured on the H100 in
#   the engine, batch-1 decode: 0.931 ms/token against 0.950 for the default then, no faster than ENGINE alone
#   (0.930), with 161-163 registers where ENGINE's build has 118 (h100/12_latency_cuda_decode_prep_early.json). Off
ENGINE = True  # the engine's decode steps take this kernel where it fits (minivllm.model.layers.decode_prep_fits).
#   Measured on the H100, batch-1 decode (bench.latency, CUDA graphs, 3 runs each): 0.930 ms/token against 0.949
#   with qkv_prep + paged_attention_warp, 1.021x (h100/12_latency_cuda_decode_prep.json); the greedy tokens part from
#   the default's at token 47 of 256, where cuBLAS's other roundings part too (h100/12_latency_cuda_token_control.json)
ENGINE_MAX_SEQS = 1  # ... steps of up to this many sequences (what bench.latency times: batch 1). Every decode step
#   on it was much slower on the offline workload, H100 back to back: 12,911 against 18,589 tok/s with the two kernels
#   above batch 1 (bench.throughput --decode-prep-max-seqs 256, h100/12_throughput_cuda_prep256.json / _prep1.json).
#   Not the kernel alone: on the H200 (python -m kernels.paged_decode_prep) it took no longer than the two kernels at
#   8 x 845 keys (14.9 against 15.5 us) and 64 x 2,048 (154.2 against 154.5; in graphs sized for 40,960 keys 140.7
#   against 141.5; bench/results/17_paged_decode_prep_cuda_session21.json). Why the workload slows is unmeasured


@cuda.jit(device=True, inline=True, fastmath=True)
def _squares(w):
    return bf16_lo(w) * bf16_lo(w) + bf16_hi(w) * bf16_hi(w)


@cuda.jit(device=True, inline=True, fastmath=True)
def _normed(w, ww, inv_rms):
    """A word's two values times ``inv_rms`` and their weights (``ww``), rounded to bf16."""
    return _word((bf16_lo(w) * inv_rms) * bf16_lo(ww), (bf16_hi(w) * inv_rms) * bf16_hi(ww))


@cuda.jit(device=True, inline=True, fastmath=True)
def _rotated(w, p, first, cos, sin, i):
    """RoPE of a word's two values (angles ``i``, ``i + 1``) with their partners' (``p``): ``a cos - b sin`` in the
    first half, ``b cos + a sin`` in the second (``a``: the first half's value, ``b`` its partner), rounded."""
    sign = numba.float32(-1.0) if first else numba.float32(1.0)
    return _word(bf16_lo(w) * cos[i] + sign * bf16_lo(p) * sin[i],
                 bf16_hi(w) * cos[i + 1] + sign * bf16_hi(p) * sin[i + 1])


@cuda.jit(device=True, inline=True, fastmath=True)
def _prep_row(src, j, ww0, ww1, ww2, ww3, norm, eps, c, cos, sin):
    """Lane ``c`` of a 16-lane row holds the 16-byte chunk ``src[j]`` of a head (values ``8 (c % 8) ..`` of the
    first half for ``c < 8``, of the second half otherwise) and returns it normalized (weights ``ww``, rounded to
    bf16) and rotated (``cos``, ``sin``: the lane's 8 angles' values), as four bf16-pair words. The whole warp must
    call it (shuffles)."""
    w0, w1, w2, w3 = load_words(src, j)
    total = _squares(w0) + _squares(w1) + _squares(w2) + _squares(w3)
    for offset in (8, 4, 2, 1):  # the head's sum of squares, in each of its 16 lanes
        total += cuda.shfl_xor_sync(FULL_MASK, total, offset)
    if norm:
        inv_rms = numba.float32(1.0) / math.sqrt(total / numba.float32(DIM) + eps)
        w0, w1 = _normed(w0, ww0, inv_rms), _normed(w1, ww1, inv_rms)
        w2, w3 = _normed(w2, ww2, inv_rms), _normed(w3, ww3, inv_rms)
    p0 = cuda.shfl_xor_sync(FULL_MASK, w0, 8)  # the RoPE partners: the same values of the other half
    p1 = cuda.shfl_xor_sync(FULL_MASK, w1, 8)
    p2 = cuda.shfl_xor_sync(FULL_MASK, w2, 8)
    p3 = cuda.shfl_xor_sync(FULL_MASK, w3, 8)
    first = c < 8
    return (_rotated(w0, p0, first, cos, sin, 0), _rotated(w1, p1, first, cos, sin, 2),
            _rotated(w2, p2, first, cos, sin, 4), _rotated(w3, p3, first, cos, sin, 6))


@functools.cache
def _kernel(group: int, warps: int, unroll: int, dynamic: bool, early: bool = False):
    """The kernel for one (group, warps, unroll): constants, so loops unroll and arrays live in registers.
    ``dynamic``: ``tokens_per_split`` is ``-minimum``, each sequence's own chunks (as ``paged_attention_warp``'s).
    ``early`` (``EARLY``): the step's inputs, the first trip's cache blocks and their keys and values are read
    before ``pdl_wait``, and the new key and value go into the registers of the lane group that scores them."""
    vpl = 8  # bf16 values a lane holds of a row: one 16-byte load
    tpw = 32 // LPR  # tokens per warp per load instruction
    slots = warps * tpw  # online-softmax states per block (one per lane group)
    span = slots * unroll  # tokens a block reads per trip
    words = 4 * unroll  # 32-bit words of K (or V) a lane holds per trip
    gd = group * vpl
    trip = _bf16_trip(group, unroll, slots, LPR)
    blocks, reads = _trip_reads(unroll, slots)
    finish = _finish(group, DIM, vpl, slots, warps * 32, True)

    def kernel(qkv, q_weight, k_weight, eps, norm, positions, cos_sin, slot_mapping, kv_cache, block_tables,
               context_lens, scale, out, partial_out, max_logits, exp_sums, tokens_per_split, num_splits, counters):
        # qkv: (seqs, (q_heads + 2 kv_heads) * 16) complex128 (16-byte chunks of bf16); q_weight, k_weight: (16,)
        # complex128; positions, slot_mapping: (seqs,) int64; cos_sin: (max_position, 128) float32; kv_cache:
        # (blocks, 2, block_size, kv_heads, 16) complex128; out: (seqs, q_heads, 128) bf16; the rest as
        # kernels.paged_attention_warp's 16-byte kernel with the fused merge
        sm_m = cuda.shared.array((slots, group), numba.float32)
        sm_l = cuda.shared.array((slots, group), numba.float32)
        sm_acc = cuda.shared.array((slots, group, DIM), numba.float32)
        sm_last = cuda.shared.array(1, numba.int32)
        qr = cuda.local.array(gd, numba.float32)
        acc = cuda.local.array(gd, numba.float32)
        kw = cuda.local.array(words, numba.int32)
        vw = cuda.local.array(words, numba.int32)
        sc = cuda.local.array(unroll, numba.float32)
        bt = cuda.local.array(unroll, numba.int32)
        m = cuda.local.array(group, numba.float32)
        l = cuda.local.array(group, numba.float32)
        cos = cuda.local.array(vpl, numba.float32)
        sin = cuda.local.array(vpl, numba.float32)
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        c = lane % LPR
        qw0, qw1, qw2, qw3 = load_words(q_weight, c)  # weights: nobody writes them, so read before the wait
        kw0, kw1, kw2, kw3 = load_words(k_weight, c)
        pdl_trigger()  # the next kernel may launch (kernels._pdl)
        if not early:
            pdl_wait()

        kvh, seq, split = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        q_heads, kv_heads = out.shape[1], kv_cache.shape[3]
        slot = warp * tpw + lane // LPR
        block_size = kv_cache.shape[2]
        bsh = pow2_shift(block_size)
        context = context_lens[seq]
        if dynamic:
            tps, start, end = _split_keys(tokens_per_split, num_splits, context, split)
        else:
            tps, start = tokens_per_split, split * tokens_per_split
            end = min(context, start + tokens_per_split)
        p = positions[seq]
        e = 8 * (c % 8)  # the lane's first angle: elements e .. e + 7 of the first half (or their partners)
        inside = 0 <= p < cos_sin.shape[0]
        for i in range(vpl):
            if inside:
                cos[i], sin[i] = cos_sin[p, e + i], cos_sin[p, e + i + DIM // 2]
            else:  # outside the table: NaN rather than a read out of bounds (as kernels.rope)
                cos[i] = sin[i] = numba.float32(np.nan)
        target = slot_mapping[seq]
        blocks(bt, block_tables, seq, start, slot, end, block_size, bsh)  # the first trip's cache blocks
        if early:  # the first trip's keys and values: written by earlier steps (the new one's slot is patched below)
            reads(kw, vw, bt, kv_cache, block_tables, seq, kvh, c, start, slot, end, block_size, bsh)
            pdl_wait()  # from here on: qkv, the previous kernel's output
        row = qkv[seq]
        for i in range(gd):
            qr[i] = acc[i] = 0.0
        for g in range(group):  # this block's query heads, prepared in registers (each lane group alike)
            m[g] = NEG_INF
            l[g] = 0.0
            if start >= end:  # a split past the context (a CUDA graph's fixed longest): no key to score
                continue
            w0, w1, w2, w3 = _prep_row(row, (kvh * group + g) * LPR + c, qw0, qw1, qw2, qw3, norm, eps, c, cos, sin)
            j = g * vpl
            qr[j + 0], qr[j + 1] = bf16_lo(w0) * scale, bf16_hi(w0) * scale
            qr[j + 2], qr[j + 3] = bf16_lo(w1) * scale, bf16_hi(w1) * scale
            qr[j + 4], qr[j + 5] = bf16_lo(w2) * scale, bf16_hi(w2) * scale
            qr[j + 6], qr[j + 7] = bf16_lo(w3) * scale, bf16_hi(w3) * scale
        new = target >= 0 and context > 0 and (context - 1) // tps == split
        k0 = k1 = k2 = k3 = v0 = v1 = v2 = v3 = numba.int32(0)
        if new:
            # this step's key (and value) into the cache: this split is the one that reads it. Every warp prepares
            # it (they would wait at the barrier below anyway; the simulator's shuffles want the block's warps
            # alike), the first row of lanes stores it
            k0, k1, k2, k3 = _prep_row(row, (q_heads + kvh) * LPR + c, kw0, kw1, kw2, kw3, norm, eps, c, cos, sin)
            v0, v1, v2, v3 = load_words(row, (q_heads + kv_heads + kvh) * LPR + c)
            if tid < LPR:
                b, o = div_pow2(target, block_size, bsh), mod_pow2(target, block_size, bsh)
                store_words(kv_cache[b, 0, o, kvh], c, k0, k1, k2, k3)
                store_words(kv_cache[b, 1, o, kvh], c, v0, v1, v2, v3)
        if not early:
            cuda.syncthreads()  # the stored key and value are visible to every warp of the block

        for first in range(start, end, span):  # the same trips for every thread (the simulator's shuffles)
            if not early or first != start:  # (early: the first trip's were read before the wait)
                reads(kw, vw, bt, kv_cache, block_tables, seq, kvh, c, first, slot, end, block_size, bsh)
            if early and new:  # the new key and value from registers (the cache held an old slot's when read)
                for u in range(unroll):
                    if first + u * slots + slot == context - 1:
                        kw[4 * u], kw[4 * u + 1], kw[4 * u + 2], kw[4 * u + 3] = k0, k1, k2, k3
                        vw[4 * u], vw[4 * u + 1], vw[4 * u + 2], vw[4 * u + 3] = v0, v1, v2, v3
            trip(qr, kw, vw, sc, m, l, acc, first, slot, end)

        finish(m, l, acc, numba.float32(1.0), sm_m, sm_l, sm_acc, sm_last, slot, c, tid, seq, kvh, split, num_splits,
               tps, out, partial_out, max_logits, exp_sums, counters, context_lens)

    name = f"paged_decode_prep_g{group}_w{warps}_u{unroll}" + ("_dyn" if dynamic else "") + ("_early" if early else "")
    kernel.__name__ = kernel.__qualname__ = name
    return mark(cuda.jit(fastmath=True)(kernel))  # early: 161-163 registers on sm_90, one 8-warp block an SM (bounded
    #   to two blocks, 128 registers, it spilled 96-116 bytes); a batch-1 step's grid has about one block an SM


_SIG = ("void(complex128[:, ::1], complex128[::1], complex128[::1], float32, boolean, int64[::1], float32[:, ::1], "
        "int64[::1], complex128[:, :, :, :, ::1], int32[:, ::1], int32[::1], float32, bfloat16[:, :, ::1], "
        "float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], int64, int64, int32[:, ::1])")
SIGNATURES = {_kernel(2, fit_warps(2, DIM, WARPS, False), UNROLL16, dynamic, early): [_SIG]
              for dynamic in (False, True) for early in (False, True)}  # Qwen3's shape (group 2)
SIGNATURES[_squares] = ["float32(int32)"]
SIGNATURES[_normed] = ["int32(int32, int32, float32)"]
SIGNATURES[_rotated] = ["int32(int32, int32, boolean, float32[::1], float32[::1], int64)"]
SIGNATURES[_prep_row] = ["UniTuple(int32, 4)(complex128[::1], int64, int32, int32, int32, int32, boolean, float32, "
                         "int64, float32[::1], float32[::1])"]


# ----------------------------------------------------------------------------- reference and launcher
def paged_decode_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, kv_cache, slot_mapping, block_tables,
                          context_lens, q_weight=None, k_weight=None, eps=1e-6, scale=None):
    """The two steps it fuses, with their references: ``kernels.qkv_prep``'s (which stores k and v) then paged
    decode attention's. Returns (seqs, q_heads, d)."""
    q, _, _ = qkv_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, kv_cache, slot_mapping, q_weight, k_weight, eps)
    return paged_attention_ref(q.contiguous(), kv_cache, block_tables, context_lens, scale).to(qkv.dtype)


def fits(qkv: torch.Tensor, kv_cache: torch.Tensor, head_dim: int, q_heads: int, kv_heads: int) -> bool:
    """Whether the fused kernel takes this step: bf16 projections and cache, head size 128, a GQA group whose
    merge buffers fit (group <= 8), 16-byte aligned rows."""
    return (qkv.dtype == kv_cache.dtype == torch.bfloat16 and head_dim == DIM and q_heads % kv_heads == 0
            and q_heads // kv_heads <= 8 and aligned16(qkv, kv_cache) and qkv.is_contiguous())


@functools.cache
def _no_weights(device: torch.device) -> torch.Tensor:
    """A placeholder for the norm's weights of a model without QK-norm, made once per device (not per call)."""
    return torch.ones(DIM, dtype=torch.bfloat16, device=device)


def paged_decode_prep(qkv: torch.Tensor, q_heads: int, kv_heads: int, positions: torch.Tensor,
                      cos_sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, q_weight: torch.Tensor | None = None,
                      k_weight: torch.Tensor | None = None, eps: float = 1e-6, *, scale: float | None = None,
                      max_context_len: int | None = None, tokens_per_split: int | None = None,
                      warps: int | None = None, dynamic_split: int | None = None, early: bool | None = None,
                      backend: str = "auto") -> torch.Tensor:
    """QK-norm (when weights are given), RoPE, the KV store and decode attention of one layer in one launch.

    qkv: (seqs, (q_heads + 2 kv_heads) * 128) bf16, one new token per sequence (the last of its context:
    ``context_lens`` counts it, ``slot_mapping`` says where it goes, -1 nowhere); positions, slot_mapping: (seqs,)
    int64; cos_sin: (max_position, 128) float32; kv_cache: one layer's (blocks, 2, block_size, kv_heads, 128) bf16;
    block_tables (seqs, width) and context_lens (seqs,) int32. Returns (seqs, q_heads, 128). ``max_context_len``,
    ``tokens_per_split``, ``warps``, ``dynamic_split``: as :func:`kernels.paged_attention_warp.paged_attention_warp`.
    ``early``: read the inputs and the first keys and values before waiting for the previous kernel; None:
    ``EARLY``."""
    check_tensor("qkv", qkv, dtypes=(torch.bfloat16,), ndim=2)
    seqs = qkv.shape[0]
    if qkv.shape[1] != (q_heads + 2 * kv_heads) * DIM or q_heads % kv_heads:
        raise ValueError(f"qkv must be (seqs, (q_heads + 2 * kv_heads) * {DIM}) with q_heads a multiple of kv_heads, "
                         f"got {tuple(qkv.shape)} for {q_heads} and {kv_heads} heads")
    check_tensor("positions", positions, dtypes=(torch.int64,), shape=(seqs,), device=qkv.device)
    check_tensor("cos_sin", cos_sin, dtypes=(torch.float32,), shape=(None, DIM), device=qkv.device)
    check_tensor("kv_cache", kv_cache, dtypes=(torch.bfloat16,), shape=(None, 2, None, kv_heads, DIM),
                 device=qkv.device)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(seqs,), device=qkv.device)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), shape=(seqs,), device=qkv.device)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, device=qkv.device)
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q_weight and k_weight (QK-norm), or neither")
    if not fits(qkv, kv_cache, DIM, q_heads, kv_heads):
        raise ValueError("paged_decode_prep takes contiguous, 16-byte aligned bf16 tensors and a GQA group <= 8")
    scale = DIM ** -0.5 if scale is None else float(scale)
    where = resolve_backend(backend, qkv, positions, cos_sin, kv_cache, slot_mapping, block_tables, context_lens)
    if where == "torch":
        return paged_decode_prep_ref(qkv, q_heads, kv_heads, positions, cos_sin, kv_cache, slot_mapping,
                                     block_tables, context_lens, q_weight, k_weight, eps, scale)
    out = torch.empty(seqs, q_heads, DIM, dtype=qkv.dtype, device=qkv.device)
    if seqs == 0:
        return out
    norm = q_weight is not None
    if not norm:
        q_weight = k_weight = _no_weights(qkv.device)  # unread: norm is False
    group = q_heads // kv_heads
    warps = fit_warps(group, DIM, WARPS if warps is None else warps, False)
    early = EARLY if early is None else early
    kernel = _kernel(group, warps, UNROLL16, False, early)
    longest = int(context_lens.max()) if max_context_len is None else max_context_len
    splits, _, tokens_per_split = plan_splits(seqs * kv_heads, longest, tokens_per_split, dynamic_split, kernel,
                                              warps * 32, qkv.device, where)
    if tokens_per_split < 0:  # each sequence cuts its own context into the splits (paged_attention_warp._split_keys)
        kernel = _kernel(group, warps, UNROLL16, True, early)
    partial, m, l = split_buffers(out, splits)
    counters = _counters(qkv.device, seqs, kv_heads)
    c16 = torch.complex128
    launch(kernel, (kv_heads, seqs, splits), warps * 32, qkv.view(c16), q_weight.view(c16), k_weight.view(c16),
           numba.float32(eps), norm, positions, cos_sin, slot_mapping, kv_cache.view(c16), block_tables,
           context_lens, numba.float32(scale), out, partial, m, l, tokens_per_split, splits, counters, backend=where)
    return out


def _main() -> None:
    """Against the two kernels it replaces; on a GPU also their times in a CUDA graph, at the grid an eager call
    sizes (the longest context) and at a CUDA graph's (``max_context_len`` 1,040 as bench.latency's, 40,960 as a
    server's default for Qwen3), with each sequence's own splits (``dynamic``) or the static ones."""
    from kernels.paged_attention_warp import paged_attention_warp
    from kernels.qkv_prep import qkv_prep
    from kernels.rope import rope_cache

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    q_heads, kv_heads, bs = 16, 8, 16
    cases = ((1, 300), (1, 4000), (8, 845), (64, 2048)) if on_gpu else ((2, 21),)
    cos_sin = rope_cache(DIM, 8192, 1e6, device=device)
    for seqs, context in cases:
        g = torch.Generator().manual_seed(seqs)
        lens = torch.full((seqs,), context, dtype=torch.int32)
        width = cdiv(40960 if on_gpu else context, bs)  # room for the longest graph below
        tables = torch.randperm(seqs * width + 2, generator=g)[: seqs * width].view(seqs, width).to(torch.int32)
        cache = torch.randn(seqs * width + 2, 2, bs, kv_heads, DIM, generator=g).to(torch.bfloat16)
        qkv = torch.randn(seqs, (q_heads + 2 * kv_heads) * DIM, generator=g).to(torch.bfloat16)
        qw, kw = ((1 + 0.1 * torch.randn(DIM, generator=g)).to(torch.bfloat16) for _ in range(2))
        positions = (lens - 1).long()
        slots = torch.stack([tables[i, (context - 1) // bs].long() * bs + (context - 1) % bs for i in range(seqs)])
        t = [x.to(device) for x in (qkv, qw, kw, positions, slots, tables, lens)]
        qkv, qw, kw, positions, slots, tables, lens = t
        caches = [cache.to(device) for _ in range(2)]

        def fused(longest=None, dynamic=None):
            return paged_decode_prep(qkv, q_heads, kv_heads, positions, cos_sin, caches[0], slots, tables, lens, qw,
                                     kw, max_context_len=longest, dynamic_split=dynamic)

        def two_kernels(longest=None, dynamic=None):
            q, _, _ = qkv_prep(qkv, q_heads, kv_heads, positions, cos_sin, caches[1], slots, qw, kw)
            return paged_attention_warp(q, caches[1], tables, lens, max_context_len=longest, dynamic_split=dynamic)

        got, want = fused(), two_kernels()
        line = (f"{seqs} x {context}: max |diff| {(got.float() - want.float()).abs().max().item():.3g}, "
                f"cache {(caches[0].float() - caches[1].float()).abs().max().item():.3g}")
        if on_gpu:
            from kernels._timing import graph_time
            from kernels.paged_attention_warp import MIN_SPLIT

            line += " | us fused / qkv_prep + attention:"
            for longest in (context, 1040, 40960):  # the grid an eager call sizes (reading the lengths back, which
                if longest < context:  # a graph capture must not), then a CUDA graph's
                    continue
                for dynamic in ((0,) if longest == context else (0, MIN_SPLIT)):
                    us = [graph_time(lambda f=f: f(longest, dynamic)).median_us for f in (fused, two_kernels)]
                    label = "eager" if longest == context else f"graph {longest}{' dynamic' if dynamic else ''}"
                    line += f"  {label} {us[0]:.2f} / {us[1]:.2f}"
        print(line)


if __name__ == "__main__":
    _main()
