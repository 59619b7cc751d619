"""Paged decode attention, version 2: one warp per key token, the head dimension across the warp's lanes.

Same contract as :func:`kernels.paged_attention.paged_attention` (version 1, the readable one)::

    q, out:       (seqs, q_heads, head_dim)
    kv_cache:     (num_blocks, 2, block_size, kv_heads, head_dim)   one layer's pool
    block_tables: (seqs, width) int32;  context_lens: (seqs,) int32

Why version 1 is slow on a GPU: its thread ``t`` reads the whole K row of token ``t``: 32 threads of a
warp touch 32 rows 4 KB apart, so every load instruction pulls 32 separate memory segments and uses 2
bytes of each. Decode attention is a pure bandwidth problem (each K and V byte is used once per query
head of the group), so that costs it almost all of the H200's 4.3 TB/s.

Here a CUDA block (sequence, KV head, split) has ``WARPS`` warps; warp ``w`` takes tokens ``w, w + WARPS,
...``. For one token, lane ``l`` holds elements ``l, l + 32, ...`` of the key and of the value: the warp
reads each row as a few fully used 64-byte segments (coalesced). Measured on the H200 (bf16, 16/8 heads
x 128; bench/results/08_paged_attention.json): with 4-byte loads this layout reached only ~24% of HBM
(each warp waits on one row at a time); reading 16 bytes per lane (8 bf16, two tokens per warp) brings it
to 54-69% of the KV-bandwidth floor at batch >= 32 and >= 2k context. In the 4-byte kernel, issuing the
loads of ``unroll`` tokens before using them was slower (its registers cost more warps than the loads in
flight gained); the 16-byte kernel can take ``unroll`` tokens per lane group per trip, load them all first
and rescale its softmax once per chunk (``bench.paged_decode`` sweeps these settings against the floor). The
score ``q_g . k`` is a sum over the lanes: five ``shfl_xor`` steps leave it in every lane. Each warp keeps
its own online softmax (running max ``m``, sum ``l``, accumulator in registers) for each of the ``group``
query heads that share the KV head, so K and V are read once for the whole group. At the end the warps'
states are merged through shared memory, exactly like split-K partial results
(``out = sum_w l_w e^(m_w - M) acc_w / sum_w ...``).

The group size and the elements per lane are compile-time constants of a kernel made per shape
(:func:`_kernel`), so the accumulators stay in registers. Split-K writes partial results that
``kernels.paged_attention.paged_attention_reduce_kernel`` merges. Limits: head_dim <= 128 (any size; lanes
past it idle), group <= 8, float32/float16/bfloat16.
"""

import functools
import math

import numba
import torch
from numba import cuda

from kernels._launch import cdiv, launch, resident_blocks, resolve_backend
from kernels._pdl import mark, pdl_trigger, pdl_wait
from kernels._checks import FP8
from kernels._index import div_pow2, mod_pow2, pow2_shift
from kernels._fp8 import (UNPACK_SCALE, e4m3x4_floats, e4m3x4_halves, e4m3x4_halves_over256, e4m3x4_over256,
                          f16x2_floats, f16x2_of, hfma2)
from kernels._vec16 import bf16_hi, bf16_lo, load_words
from kernels.paged_attention import _check, merge_splits, paged_attention_ref, split_buffers

WARPS = 8  # warps per block. Measured (bench.paged_decode): 8 warps x unroll 4 beats 4 x 4 on the engine's own
#   cases on both GPUs -- the workload's mixed batch 139 by 7% (H200 199 vs 214 us, H100 206 vs 220) and the
#   graphs' batch 1 by 14% / 11% -- and is within 4% on the synthetic batch >= 32 cases
UNROLL = 1  # 4-byte kernel: tokens per warp per trip; 4 and 8 measured slower on the H200 (more registers, fewer warps)
WARPS_4B = 4  # 4-byte kernel (fp32 or fp16 caches, head dims the 16-byte one does not take): warps per block, as
#   measured on the H200; WARPS above is the 16-byte kernel's, the one bf16 models run
UNROLL16 = 4  # 16-byte kernel: tokens per lane group per trip, all loaded before any is used (several loads in
#   flight per lane). Measured: 4 is the best of 1, 2, 4, 8 on the H200 and the H100 (8 is twice as slow)
MIN_SPLIT = 64  # split-K: the fewest keys one block takes when the grid is split to fill the GPU
MAX_SPLIT = None  # split-K on a full grid: the most keys one block takes (None: a block takes its whole context).
#   Chunks of MAX_SPLIT keys would even out a grid's last wave; measured on the H100, every cap (256, 512,
#   1,024 keys) was slower at batch >= 64 (up to 14%: more blocks, more merging), none faster by over 0.2%
SPLIT_RULE = "waves"  # how a small grid is split: "waves" = into at most one full wave of blocks; "fill" = the
#   earlier rule, at least one wave (batch 32 x 2k keys: 3 splits = 768 blocks = 1.45 waves, 53% of the floor
#   on the H200). Measured on the H100: "waves" 97 us against "fill" 105 at batch 32 x 2k, equal elsewhere
#   except the graphs' batch 8 (28 against 25 us)
FP8_CVT = True  # an fp8 pool on sm_89+: widen its bytes with the hardware's conversion rather than masks and
#   shifts. Measured on the H200: 8-11% faster on every case of batch >= 8 (the workload's mixed batch 138 against
#   152 us), within 2% at batch 1; its GPU test passed there
FP8_HALF2 = True  # an fp8 pool: multiply-add the widened values as fp16 pairs (two per instruction, no widening
#   to fp32); each token's score and each trip's weighted values go back to fp32. Measured on the H100 with the
#   hardware conversion: 4-10% faster than fp32 arithmetic on every case (the workload's mixed batch: 128 against
#   141 us; batch >= 32 x 8k: 90-91% of the fp8 floor), error against the reference 1e-3 (fp32: 6e-5)
FUSED_MERGE = True  # split-K steps merge in the kernel's last block instead of a second kernel (the 16-byte
#   kernel; one launch fewer per layer at small decode batches). Measured on the H100 (bench.paged_decode, CUDA-graph
#   replay): batch 1 x 300 tokens 8.2 against 9.2 us, batch 8 mixed 27.2 against 28.4
#   (bench/results/h100/17_paged_decode_cuda.json, 12-05 session 8)
DYNAMIC_SPLIT = None  # split-K with the fused merge, split size picked by the launcher: each sequence cuts its own
#   context into the grid's splits (at least MIN_SPLIT keys each; _split_keys) instead of chunks sized for the longest
#   context the grid allows. True / False: always / never; None: for grids sized for DYNAMIC_SPLIT_MIN_KEYS keys or
#   more. A CUDA graph's grid is sized for max_model_len: with the static chunks a 300-key request under a 40,960-key
#   limit is one block per KV head. Measured with bench.latency, batch 1, 3 runs each: on the H100 under
#   --max-model-len 40960 with a 2,000-token prompt 1.193 against 1.676 ms/token
#   (h100/12_latency_cuda_max_len_40960.json);
#   at the default 1,041-key limit, where both cut the same chunks, 0.862 against 0.829 on the H200
#   (12_latency_cuda_session21.json; on the H100 1.042 against 0.928 in one noisy run,
#   h100/12_latency_cuda_dynamic_split.json)
DYNAMIC_SPLIT_MIN_KEYS = 32768  # ... hence on under Qwen3's own limit (40,960), off under short ones; limits between
#   1,041 and 40,960 keys are unmeasured. The rule's own first GPU run (H100, e7d9119, same settings as above): 1.292
#   against 1.610 ms/token for the static chunks (h100/12_latency_cuda_max_len_40960_session23.json)
HEADS_FIRST = True  # the 16-byte kernel's grid (kv_heads, seqs, splits): the GPU dispatches blocks x first, so a
#   sequence's KV heads go out one after another; with the scheduler's rows longest context first
#   (minivllm.scheduler.row_order) the longest sequences' blocks all start first. (seqs, kv_heads, splits) sent
#   every sequence's first head before any second head. Measured on the H100 (graph replay, rows longest first,
#   Qwen3-0.6B's heads): 139 contexts of 100-2,048 tokens 200.5 against 211.6 µs (97% against 92% of the floor),
#   64 of them 85.6 against 109.4 (96% / 75%), 200: 284.1 / 290.5; 256: 394.7 / 391.8 and uniform contexts within 1%
#   (a development script of that session; ``python -m bench.decode_order`` makes the same comparison, rows in arrival
#   order too, and writes 17_decode_order_cuda.json).
#   The offline workload did not tell them apart: 18,718 and 18,937 tok/s against 19,023 and 18,693 (A/B/A/B,
#   bench/results/h100/12_throughput_cuda_grid_*.json)
NEG_INF = -math.inf
FULL_MASK = 0xFFFFFFFF
_COUNTERS: dict = {}  # device -> the fused merge's int32 counters, zero between launches (graphs replay them)


def _counters(device: torch.device, seqs: int, kv_heads: int) -> torch.Tensor:
    """The fused merge's counters for ``seqs`` x ``kv_heads`` blocks: one zeroed tensor per device, made once
    (with room for 1,024 sequences, so that CUDA-graph capture, which must not allocate, finds it made)."""
    have = _COUNTERS.get(device)
    if have is None or have.shape[0] < seqs or have.shape[1] < kv_heads:
        have = torch.zeros(max(seqs, 1024), max(kv_heads, 8), dtype=torch.int32, device=device)
        _COUNTERS[device] = have
    return have


@cuda.jit(device=True, inline=True)
def _merge_states(sm_m, sm_l, sm_acc, states, group, dim, tid, threads, seq, kvh, split, num_splits, out, partial_out,
                  max_logits, exp_sums):
    """Merge the block's ``states`` online-softmax states (max, sum, accumulator per query head of the group,
    in shared memory) into the output, or into this split's partial result:
    ``out = sum_s l_s e^(m_s - M) acc_s / sum_s l_s e^(m_s - M)``."""
    for i in range(tid, group * dim, threads):
        g, d = i // dim, i % dim
        big = numba.float32(NEG_INF)
        for s in range(states):
            big = max(big, sm_m[s, g])
        num = numba.float32(0.0)
        den = numba.float32(0.0)
        for s in range(states):
            if sm_l[s, g] > 0.0:  # a state that saw no token adds nothing (and no NaN)
                e = math.exp(sm_m[s, g] - big)
                num += sm_acc[s, g, d] * e
                den += sm_l[s, g] * e
        value = num / den if den > 0.0 else numba.float32(0.0)
        h = kvh * group + g
        if num_splits == 1:
            out[seq, h, d] = value
        else:
            partial_out[seq, h, split, d] = value
            if d == 0:
                max_logits[seq, h, split] = big
                exp_sums[seq, h, split] = den


@cuda.jit(device=True, inline=True)
def _split_keys(tokens_per_split, num_splits, context, split):
    """(keys per split, this block's first key, its end) for a sequence of ``context`` keys: chunks of
    ``tokens_per_split`` keys when it is positive; when negative (``-minimum``, ``DYNAMIC_SPLIT``), the sequence's
    own context cut into ``num_splits`` chunks of at least ``minimum`` keys, so that a grid sized for the longest
    context (a CUDA graph's) still spreads a short one over several blocks."""
    tps = tokens_per_split
    if tps < 0:
        tps = max(-tokens_per_split, (context + num_splits - 1) // num_splits)
    start = split * tps
    return tps, start, min(context, start + tps)


@cuda.jit(device=True, inline=True)
def _last_block_merges(counters, context_lens, tokens_per_split, num_splits, partial_out, max_logits, exp_sums, out,
                       seq, kvh, group, dim, tid, threads, sm_last):
    """Split-K without a merge kernel: called by every block after it wrote its split's partial result; the last
    block of (``seq``, ``kvh``) to get here merges the splits that saw keys (as ``paged_attention_reduce_kernel``
    does) and resets the counter."""
    cuda.threadfence()  # this block's partial result is visible to every block before it counts itself done
    cuda.syncthreads()
    if tid == 0:
        sm_last[0] = 1 if cuda.atomic.add(counters, (seq, kvh), 1) == num_splits - 1 else 0
    cuda.syncthreads()
    if sm_last[0] == 0:
        return
    cuda.threadfence()
    used = (context_lens[seq] + tokens_per_split - 1) // tokens_per_split
    for i in range(tid, group * dim, threads):
        h, d = kvh * group + i // dim, i % dim
        big = numba.float32(NEG_INF)
        for s in range(used):
            big = max(big, max_logits[seq, h, s])
        num = numba.float32(0.0)
        den = numba.float32(0.0)
        for s in range(used):
            e = exp_sums[seq, h, s] * math.exp(max_logits[seq, h, s] - big)
            num += partial_out[seq, h, s, d] * e
            den += e
        out[seq, h, d] = num / den
    if tid == 0:
        counters[seq, kvh] = 0  # ready for the next launch (or graph replay)


@functools.cache
def _kernel(group: int, dim: int, warps: int, unroll: int):
    """The kernel for one (group, head_dim, warps): constants, so loops unroll and arrays live in registers."""
    epl = (dim + 31) // 32  # elements per lane
    gd = group * epl
    width = epl * 32  # lanes x elements per lane
    rows = unroll * epl  # K (or V) elements a lane holds per trip

    def kernel(q, kv_cache, block_tables, context_lens, scale, out, partial_out, max_logits, exp_sums,
               tokens_per_split, num_splits):
        sm_m = cuda.shared.array((warps, group), numba.float32)
        sm_l = cuda.shared.array((warps, group), numba.float32)
        sm_acc = cuda.shared.array((warps, group, width), numba.float32)
        qr = cuda.local.array(gd, numba.float32)  # this lane's elements of the group's queries, times scale
        acc = cuda.local.array(gd, numba.float32)
        kr = cuda.local.array(rows, numba.float32)
        vr = cuda.local.array(rows, numba.float32)
        valid = cuda.local.array(unroll, numba.boolean)
        m = cuda.local.array(group, numba.float32)
        l = cuda.local.array(group, numba.float32)
        pdl_trigger()  # the next kernel may launch; nothing is read before the previous one has ended (kernels._pdl)
        pdl_wait()

        seq, kvh, split = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        block_size = kv_cache.shape[2]
        bsh = pow2_shift(block_size)  # a shift and a mask for the block of token t, not an int64 division
        start = split * tokens_per_split
        end = min(context_lens[seq], start + tokens_per_split)
        for g in range(group):
            m[g] = NEG_INF
            l[g] = 0.0
            for j in range(epl):
                d = lane + 32 * j
                qr[g * epl + j] = numba.float32(q[seq, kvh * group + g, d]) * scale if d < dim else 0.0
                acc[g * epl + j] = 0.0

        # NOTE: every warp makes the same number of trips (the last may hold no token): the CUDA simulator
        # needs all threads of a block at each shuffle; on the GPU it costs one partly idle trip at most
        for first in range(start, end, warps * unroll):
            for u in range(unroll):  # issue all loads first: `unroll` rows of K and V in flight per warp
                t = first + u * warps + warp
                ok = t < end
                b, o = 0, 0
                if ok:
                    b = block_tables[seq, div_pow2(t, block_size, bsh)]
                    o = mod_pow2(t, block_size, bsh)
                valid[u] = ok
                for j in range(epl):  # one coalesced row read each for K and V
                    d = lane + 32 * j
                    kr[u * epl + j] = numba.float32(kv_cache[b, 0, o, kvh, d]) if ok and d < dim else 0.0
                    vr[u * epl + j] = numba.float32(kv_cache[b, 1, o, kvh, d]) if ok and d < dim else 0.0
            for u in range(unroll):
                for g in range(group):
                    s = numba.float32(0.0)
                    for j in range(epl):
                        s += qr[g * epl + j] * kr[u * epl + j]
                    for offset in (16, 8, 4, 2, 1):  # the sum over the warp, left in every lane
                        s += cuda.shfl_xor_sync(FULL_MASK, s, offset)
                    if not valid[u]:
                        continue
                    m_new = max(m[g], s)
                    alpha = math.exp(m[g] - m_new)  # 0 on this warp's first token (m = -inf)
                    p = math.exp(s - m_new)
                    l[g] = l[g] * alpha + p
                    m[g] = m_new
                    for j in range(epl):
                        acc[g * epl + j] = acc[g * epl + j] * alpha + p * vr[u * epl + j]

        for g in range(group):  # merge the warps' online-softmax states
            if lane == 0:
                sm_m[warp, g] = m[g]
                sm_l[warp, g] = l[g]
            for j in range(epl):
                sm_acc[warp, g, lane + 32 * j] = acc[g * epl + j]
        cuda.syncthreads()
        _merge_states(sm_m, sm_l, sm_acc, warps, group, dim, tid, warps * 32, seq, kvh, split, num_splits, out,
                      partial_out, max_logits, exp_sums)

    kernel.__name__ = kernel.__qualname__ = f"paged_decode_g{group}_d{dim}_w{warps}_u{unroll}"
    return mark(cuda.jit(fastmath=True)(kernel))


@functools.cache
def _bf16_trip(group: int, unroll: int, slots: int, lpr: int):
    """One trip of the 16-byte kernel on a bf16 cache, for each query head of the group: the scores of the lane
    group's ``unroll`` tokens (``kw``: their K rows as bf16 pairs, summed over the row's ``lpr`` lanes), then one
    rescale of its online softmax and the weighted values (``vw``). Shared by the kernels that read the cache
    this way (``kernels.paged_decode_prep`` too)."""
    offsets = tuple(lpr >> (k + 1) for k in range(lpr.bit_length() - 1))  # lpr/2, ..., 1: sums within a row

    def trip(qr, kw, vw, sc, m, l, acc, first, slot, end):
        seen = first + slot < end  # this lane group's first token of the chunk exists (so its scores count)
        for g in range(group):
            top = m[g]
            for u in range(unroll):
                s = numba.float32(0.0)
                for i in range(4):
                    w = kw[4 * u + i]
                    s += qr[g * 8 + 2 * i] * bf16_lo(w) + qr[g * 8 + 2 * i + 1] * bf16_hi(w)
                for offset in offsets:  # the sum over the row's lanes, left in each of them
                    s += cuda.shfl_xor_sync(FULL_MASK, s, offset)
                sc[u] = s
                if first + u * slots + slot < end:
                    top = max(top, s)
            if not seen:
                continue
            alpha = math.exp(m[g] - top)  # 0 on this lane group's first chunk (m = -inf)
            m[g] = top
            total = l[g] * alpha
            for i in range(8):
                acc[g * 8 + i] *= alpha
            for u in range(unroll):
                p = numba.float32(0.0)
                if first + u * slots + slot < end:
                    p = math.exp(sc[u] - top)
                total += p
                for i in range(4):
                    w = vw[4 * u + i]
                    acc[g * 8 + 2 * i] += p * bf16_lo(w)
                    acc[g * 8 + 2 * i + 1] += p * bf16_hi(w)
            l[g] = total

    return cuda.jit(device=True, inline=True, fastmath=True)(trip)  # as the kernels that call it


@functools.cache
def _trip_reads(unroll: int, slots: int):
    """Device functions of the 16-byte kernels' trips (``unroll`` tokens per lane group, ``slots`` lane groups):
    ``blocks`` reads the cache blocks of the trip starting at ``first``; ``reads`` issues that trip's K and V
    loads (16 bytes a row a lane, as bf16 pairs or e4m3 quads) and then the next trip's blocks, so a trip waits on
    one memory round trip, not two in a row."""
    span = slots * unroll

    def blocks(bt, block_tables, seq, first, slot, end, block_size, bsh):
        for u in range(unroll):  # (a token past the end reads block 0: never used)
            t = first + u * slots + slot
            bt[u] = block_tables[seq, div_pow2(t, block_size, bsh)] if t < end else 0

    blocks = cuda.jit(device=True, inline=True)(blocks)

    def reads(kw, vw, bt, kv_cache, block_tables, seq, kvh, c, first, slot, end, block_size, bsh):
        for u in range(unroll):  # token first + u * slots + slot: neighbouring lane groups, neighbouring rows
            t = first + u * slots + slot
            b, o = bt[u], mod_pow2(t, block_size, bsh)
            kw[4 * u], kw[4 * u + 1], kw[4 * u + 2], kw[4 * u + 3] = load_words(kv_cache[b, 0, o, kvh], c)
            vw[4 * u], vw[4 * u + 1], vw[4 * u + 2], vw[4 * u + 3] = load_words(kv_cache[b, 1, o, kvh], c)
        blocks(bt, block_tables, seq, first + span, slot, end, block_size, bsh)  # while these are in flight

    return blocks, cuda.jit(device=True, inline=True)(reads)


@functools.cache
def _finish(group: int, dim: int, vpl: int, slots: int, threads: int, fused: bool):
    """The 16-byte kernels' end: each lane group's online-softmax state into shared memory (its accumulators times
    ``mul``), merged into the output or this split's partial result, and (``fused``, split-K) the merge of the
    splits by the last block."""

    def finish(m, l, acc, mul, sm_m, sm_l, sm_acc, sm_last, slot, c, tid, seq, kvh, split, num_splits, tps, out,
               partial_out, max_logits, exp_sums, counters, context_lens):
        for g in range(group):
            if c == 0:
                sm_m[slot, g] = m[g]
                sm_l[slot, g] = l[g]
            for i in range(vpl):
                sm_acc[slot, g, c * vpl + i] = acc[g * vpl + i] * mul
        cuda.syncthreads()
        _merge_states(sm_m, sm_l, sm_acc, slots, group, dim, tid, threads, seq, kvh, split, num_splits, out,
                      partial_out, max_logits, exp_sums)
        if fused and num_splits > 1:
            _last_block_merges(counters, context_lens, tps, num_splits, partial_out, max_logits, exp_sums, out, seq,
                               kvh, group, dim, tid, threads, sm_last)

    return cuda.jit(device=True, inline=True)(finish)


def _kernel16(group: int, dim: int, warps: int, unroll: int, fp8: bool = False, cvt: bool = False,
              half2: bool = False, fused: bool = False, heads_first: bool = True, dynamic: bool = False):
    """The 16-byte kernel's build for these settings (:func:`_build16`), made once however the call spells them."""
    return _build16(group, dim, warps, unroll, fp8, cvt, half2, fused, heads_first, dynamic)


@functools.cache
def _build16(group: int, dim: int, warps: int, unroll: int, fp8: bool, cvt: bool, half2: bool, fused: bool,
             heads_first: bool, dynamic: bool):
    """bf16 only: each lane loads 16 bytes (8 values) of a row at once; ``dim // 8`` lanes hold a row, so a
    warp reads ``32 // (dim // 8)`` tokens per load instruction (2 at head_dim 128), each lane group keeping
    its own online softmax. A lane group takes ``unroll`` tokens per trip: it issues all their K and V loads
    before using any (more bytes in flight per warp), then updates its softmax once for the chunk (one
    rescale instead of ``unroll``). A token's K and V address needs its cache block from the block table first:
    the table entries of the next trip are read while this trip's K and V are in flight, so a trip waits on one
    memory round trip instead of two in a row. The pool and queries arrive as complex128 views (one 16-byte
    element each).

    ``fp8``: the pool holds e4m3 bytes (``kernels._fp8``; queries and output stay bf16). The same 16-byte load
    is then 16 values, so ``dim // 16`` lanes hold a row and a warp reads twice the tokens per instruction. A
    word unpacks to four values divided by 256; the queries are multiplied by 256 once (scores come out right),
    and so are the accumulators when they leave the registers. ``cvt`` (sm_89+): the hardware widens the bytes
    instead (``kernels._fp8.e4m3x4_floats``: true values, so no factor), less than half the instructions.

    ``half2`` (fp8): the widened bytes stay fp16 pairs and are multiplied and added two at a time
    (``fma.rn.f16x2``) against fp16 pairs of the queries, then of the softmax weights. A token's score leaves
    fp16 after its lane's 16 products (the 256 goes on the score, not the queries, so fp16 cannot overflow); the
    weighted values of a trip (``unroll`` tokens) are added into the fp32 accumulators. Pairs pair bytes
    (0, 2), (1, 3) for the masks and shifts, (0, 1), (2, 3) for the hardware conversion.

    ``fused`` (split-K): no second kernel merges the splits. Each block writes its split's partial result, then
    counts itself done on ``counters[seq, kv_head]`` (an atomic add, after a memory fence); the block that
    finds every other split done merges them all into the output and sets the counter back to 0 (so a CUDA
    graph can replay it). One launch instead of two, for the steps that split: small decode batches.

    ``dynamic``: ``tokens_per_split`` is ``-minimum`` and each sequence cuts its own context into the grid's splits
    (:func:`_split_keys`, ``DYNAMIC_SPLIT``)."""
    vpl = 16 if fp8 else 8  # values per lane per row: one 16-byte load
    lpr = dim // vpl  # lanes per row
    tpw = 32 // lpr  # tokens per warp per load instruction
    slots = warps * tpw  # online-softmax states per block (one per lane group)
    span = slots * unroll  # tokens a block reads per trip
    words = 4 * unroll  # 32-bit words of K (or V) a lane holds per trip
    gd = group * vpl
    heads_per_trip = unroll * group  # fp8: (token, query head) scores a lane group holds per trip
    offsets = tuple(lpr >> (k + 1) for k in range(lpr.bit_length() - 1))  # lpr/2, ..., 1: sums within a row
    qmul = numba.float32(UNPACK_SCALE if fp8 and not cvt else 1.0)
    qin = numba.float32(1.0 if half2 else qmul)  # what the queries are multiplied by (with the scale)
    smul = numba.float32(qmul if half2 else 1.0)  # what a score is multiplied by
    pairs = gd // 2 if half2 else 1  # fp8 + half2: the queries (and a trip's weighted values) as fp16 pairs
    adj = 1 if cvt else 2  # the pair partner's offset within a word's 4 values: (0, 1) cvt, (0, 2) masks + shifts
    trip = _bf16_trip(group, unroll, slots, lpr)  # the bf16 cache's trip
    blocks, reads = _trip_reads(unroll, slots)
    finish = _finish(group, dim, vpl, slots, warps * 32, fused)

    def kernel(q, kv_cache, block_tables, context_lens, scale, out, partial_out, max_logits, exp_sums,
               tokens_per_split, num_splits, counters):
        # q: (seqs, q_heads, dim // 8) complex128; kv_cache: (blocks, 2, block_size, kv_heads, dim // lpr) complex128
        # counters: (>= seqs, kv_heads) int32, zero between launches (``fused`` only; otherwise unused)
        sm_m = cuda.shared.array((slots, group), numba.float32)
        sm_l = cuda.shared.array((slots, group), numba.float32)
        sm_acc = cuda.shared.array((slots, group, dim), numba.float32)
        sm_last = cuda.shared.array(1, numba.int32)
        qr = cuda.local.array(gd, numba.float32)
        acc = cuda.local.array(gd, numba.float32)
        kw = cuda.local.array(words, numba.int32)  # the chunk's K rows, still as bf16 pairs (or e4m3 quads)
        vw = cuda.local.array(words, numba.int32)
        sc = cuda.local.array(unroll, numba.float32)
        ps = cuda.local.array(heads_per_trip, numba.float32)  # fp8: the chunk's scores, then weights, per head
        bt = cuda.local.array(unroll, numba.int32)  # the cache blocks of the trip's tokens, read one trip ahead
        m = cuda.local.array(group, numba.float32)
        l = cuda.local.array(group, numba.float32)
        qh = cuda.local.array(pairs, numba.int32)
        vh = cuda.local.array(pairs, numba.int32)
        hs = cuda.local.array(heads_per_trip, numba.int32)
        pp = cuda.local.array(group, numba.int32)
        pdl_trigger()  # the next kernel may launch; nothing is read before the previous one has ended
        pdl_wait()

        if heads_first:  # the grid is (kv_heads, seqs, splits): a sequence's heads are dispatched one after another
            kvh, seq, split = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        else:
            seq, kvh, split = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        c = lane % lpr  # this lane's 16-byte chunk of a row: elements vpl c .. vpl c + vpl - 1
        slot = warp * tpw + lane // lpr
        block_size = kv_cache.shape[2]
        bsh = pow2_shift(block_size)  # a shift and a mask for the block of token t, not an int64 division
        if dynamic:  # tokens_per_split < 0: this sequence's own chunks (a build of its own: the others unchanged)
            tps, start, end = _split_keys(tokens_per_split, num_splits, context_lens[seq], split)
        else:
            tps, start = tokens_per_split, split * tokens_per_split
            end = min(context_lens[seq], start + tokens_per_split)
        for g in range(group):
            m[g] = NEG_INF
            l[g] = 0.0
            qs = scale * qin
            for h in range(vpl // 8):  # the lane's vpl query values: 1 (bf16 cache) or 2 (fp8) 16-byte pieces
                w0, w1, w2, w3 = load_words(q[seq, kvh * group + g], c * (vpl // 8) + h)
                j = g * vpl + 8 * h
                qr[j + 0], qr[j + 1] = bf16_lo(w0) * qs, bf16_hi(w0) * qs
                qr[j + 2], qr[j + 3] = bf16_lo(w1) * qs, bf16_hi(w1) * qs
                qr[j + 4], qr[j + 5] = bf16_lo(w2) * qs, bf16_hi(w2) * qs
                qr[j + 6], qr[j + 7] = bf16_lo(w3) * qs, bf16_hi(w3) * qs
            for i in range(vpl):
                acc[g * vpl + i] = 0.0
            if half2:
                for i in range(vpl // 4):  # word i's values 4i..4i+3: pairs (4i, 4i + adj), (the other two)
                    j, k = g * vpl + 4 * i, g * vpl // 2 + 2 * i
                    qh[k] = f16x2_of(qr[j], qr[j + adj])
                    qh[k + 1] = f16x2_of(qr[j + 3 - adj], qr[j + 3])

        blocks(bt, block_tables, seq, start, slot, end, block_size, bsh)  # the first trip's cache blocks
        for first in range(start, end, span):  # the same trips for every thread (see the simulator NOTE)
            reads(kw, vw, bt, kv_cache, block_tables, seq, kvh, c, first, slot, end, block_size, bsh)
            seen = first + slot < end  # this lane group's first token of the chunk exists (so its scores count)
            if half2:  # fp16 pairs: each word's bytes widened once, two multiply-adds per instruction
                for k in range(heads_per_trip):
                    hs[k] = 0
                for u in range(unroll):
                    for i in range(4):
                        a, b = e4m3x4_halves(kw[4 * u + i]) if cvt else e4m3x4_halves_over256(kw[4 * u + i])
                        for g in range(group):
                            k = g * vpl // 2 + 2 * i
                            hs[u * group + g] = hfma2(qh[k + 1], b, hfma2(qh[k], a, hs[u * group + g]))
                for k in range(heads_per_trip):
                    lo, hi = f16x2_floats(hs[k])
                    s = (lo + hi) * smul
                    for offset in offsets:  # the sum over the row's lanes, left in each of them
                        s += cuda.shfl_xor_sync(FULL_MASK, s, offset)
                    ps[k] = s
            elif fp8:  # unpacking costs more than bf16's shift: each word once, for all the group's heads at once
                for k in range(heads_per_trip):
                    ps[k] = 0.0
                for u in range(unroll):
                    for i in range(4):
                        x0, x1, x2, x3 = e4m3x4_floats(kw[4 * u + i]) if cvt else e4m3x4_over256(kw[4 * u + i])
                        for g in range(group):
                            j = g * vpl + 4 * i
                            ps[u * group + g] += qr[j] * x0 + qr[j + 1] * x1 + qr[j + 2] * x2 + qr[j + 3] * x3
                for k in range(heads_per_trip):
                    s = ps[k]
                    for offset in offsets:  # the sum over the row's lanes, left in each of them
                        s += cuda.shfl_xor_sync(FULL_MASK, s, offset)
                    ps[k] = s
            if fp8:
                if seen:
                    for g in range(group):  # scores -> weights p, each head's softmax rescaled once
                        top = m[g]
                        for u in range(unroll):
                            if first + u * slots + slot < end:
                                top = max(top, ps[u * group + g])
                        alpha = math.exp(m[g] - top)  # 0 on this lane group's first chunk (m = -inf)
                        m[g] = top
                        total = l[g] * alpha
                        for i in range(vpl):
                            acc[g * vpl + i] *= alpha
                        for u in range(unroll):
                            p = numba.float32(0.0)
                            if first + u * slots + slot < end:
                                p = math.exp(ps[u * group + g] - top)
                            ps[u * group + g] = p
                            total += p
                        l[g] = total
                    if half2:  # the trip's weighted values in fp16 pairs, then added into fp32 once
                        for k in range(pairs):
                            vh[k] = 0
                        for u in range(unroll):
                            for g in range(group):
                                pp[g] = f16x2_of(ps[u * group + g], ps[u * group + g])
                            for i in range(4):
                                a, b = e4m3x4_halves(vw[4 * u + i]) if cvt else e4m3x4_halves_over256(vw[4 * u + i])
                                for g in range(group):
                                    k = g * vpl // 2 + 2 * i
                                    vh[k] = hfma2(pp[g], a, vh[k])
                                    vh[k + 1] = hfma2(pp[g], b, vh[k + 1])
                        for g in range(group):
                            for i in range(vpl // 4):
                                j, k = g * vpl + 4 * i, g * vpl // 2 + 2 * i
                                x0, x1 = f16x2_floats(vh[k])
                                x2, x3 = f16x2_floats(vh[k + 1])
                                acc[j] += x0
                                acc[j + adj] += x1
                                acc[j + 3 - adj] += x2
                                acc[j + 3] += x3
                    else:
                        for u in range(unroll):
                            for i in range(4):
                                x0, x1, x2, x3 = (e4m3x4_floats(vw[4 * u + i]) if cvt
                                                  else e4m3x4_over256(vw[4 * u + i]))
                                for g in range(group):
                                    p, j = ps[u * group + g], g * vpl + 4 * i
                                    acc[j] += p * x0
                                    acc[j + 1] += p * x1
                                    acc[j + 2] += p * x2
                                    acc[j + 3] += p * x3
                continue
            trip(qr, kw, vw, sc, m, l, acc, first, slot, end)

        finish(m, l, acc, qmul, sm_m, sm_l, sm_acc, sm_last, slot, c, tid, seq, kvh, split, num_splits, tps, out,
               partial_out, max_logits, exp_sums, counters, context_lens)  # fp8: the values were read / 256

    kind = ("16_fp8cvt" if cvt else "16_fp8") + ("h2" if half2 else "") if fp8 else "16"
    kind += ("_fused" if fused else "") + ("_dyn" if dynamic else "")
    kernel.__name__ = kernel.__qualname__ = f"paged_decode{kind}_g{group}_d{dim}_w{warps}_u{unroll}" + (
        "" if heads_first else "_seqs_first")
    return mark(cuda.jit(fastmath=True)(kernel))


_TYPES = ("float32", "float16", "bfloat16")
SIGNATURES = {  # the shapes the course's models launch: Qwen3 (group 2, head_dim 128), SmolLM2 (3, 64)
    _kernel(group, dim, WARPS_4B, UNROLL): [
        f"void({t}[:, :, ::1], {t}[:, :, :, :, ::1], int32[:, ::1], int32[::1], float32, {t}[:, :, ::1], "
        f"float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], int64, int64)" for t in _TYPES]
    for group, dim in ((2, 128), (3, 64))
}
SIGNATURES[_split_keys] = ["UniTuple(int64, 3)(int64, int64, int32, int64)"]
SIGNATURES[_last_block_merges] = [
    "void(int32[:, ::1], int32[::1], int64, int64, float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], "
    "bfloat16[:, :, ::1], int64, int64, int64, int64, int64, int64, int32[::1])"]
SIGNATURES[_merge_states] = [
    f"void(float32[:, ::1], float32[:, ::1], float32[:, :, ::1], int64, int64, int64, int64, int64, int64, int64, "
    f"int64, int64, {t}[:, :, ::1], float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1])" for t in _TYPES]


@functools.cache
def fit_warps(group: int, dim: int, warps: int, fp8: bool) -> int:
    """The most warps, up to ``warps``, whose merge buffers (``sm_acc``: a state per lane group) fit the 48 KB of
    static shared memory a block may have: an fp8 row takes half the lanes, so a warp holds twice the states."""
    tpw = 32 // (dim // (16 if fp8 else 8))
    while warps > 1 and warps * tpw * group * (dim + 2) * 4 > 48 * 1024:
        warps //= 2
    return warps


_SIG16 = ("void(complex128[:, :, ::1], complex128[:, :, :, :, ::1], int32[:, ::1], int32[::1], float32, "
          "bfloat16[:, :, ::1], float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], int64, int64, "
          "int32[:, ::1])")
_VARIANTS = ((False, False, False), (True, False, False), (True, True, False), (True, False, True), (True, True, True))
SIGNATURES.update({_kernel16(2, 128, fit_warps(2, 128, WARPS, fp8), UNROLL16, fp8, cvt, half2, False, HEADS_FIRST):
                   [_SIG16]
                   for fp8, cvt, half2 in _VARIANTS})  # the builds bench.paged_decode compares: at Qwen3's shape only
#   (the same code at SmolLM2's shape is the fused builds', below; each build ~4 s of the test suite's compile run)
_FUSED = ((False, False, False), (True, False, True), (True, True, True))  # the defaults: bf16, fp8 (sm_80, sm_89+)
SIGNATURES.update({_kernel16(group, dim, fit_warps(group, dim, WARPS, fp8), UNROLL16, fp8, cvt, half2, True,
                             HEADS_FIRST): [_SIG16]
                   for group, dim in ((2, 128), (3, 64)) for fp8, cvt, half2 in _FUSED})  # fused merge
SIGNATURES[_kernel16(2, 128, fit_warps(2, 128, WARPS, False), UNROLL16, False, False, False, True, HEADS_FIRST,
                     True)] = [_SIG16]  # DYNAMIC_SPLIT's build of the bf16 default
CVT_CC = (8, 9)  # cvt.rn.f16x2.e4m3x2: Ada and newer
MIN_TARGETS = {_kernel16(group, dim, fit_warps(group, dim, WARPS, True), UNROLL16, True, True, half2, fused,
                         HEADS_FIRST): CVT_CC
               for group, dim in ((2, 128), (3, 64)) for half2, fused in ((False, False), (True, False), (True, True))
               if fused or group == 2}
#              built for sm_89+ only


@functools.cache
def _has_cvt(index: int) -> bool:
    """Whether CUDA device ``index`` converts e4m3 in hardware (compute capability 8.9 or newer)."""
    return torch.cuda.get_device_capability(index) >= CVT_CC


def split_size(blocks: int, longest: int, slots: int) -> int | None:
    """Keys per split-K chunk for a grid of ``blocks`` (seqs x kv_heads) over contexts of up to ``longest`` keys,
    on a GPU that runs ``slots`` blocks at once; None: no split. A grid smaller than one wave is split into
    ``slots // blocks`` chunks each (``SPLIT_RULE`` "waves": the grid stays within one wave) or ``cdiv(slots,
    blocks)`` ("fill"), of at least ``MIN_SPLIT`` keys; a larger grid is cut into chunks of ``MAX_SPLIT`` keys,
    when that is set. The module's constants are read at call time (``bench.paged_decode`` sweeps them)."""
    if blocks < slots and longest > MIN_SPLIT:
        splits = slots // blocks if SPLIT_RULE == "waves" else cdiv(slots, blocks)
        chunk = max(MIN_SPLIT, cdiv(longest, splits))
        return chunk if chunk < longest else None
    if MAX_SPLIT is not None and longest > MAX_SPLIT:
        return MAX_SPLIT
    return None


def plan_splits(blocks: int, longest: int, tokens_per_split: int | None, dynamic_split: int | None, kernel,
                threads: int, device: torch.device, where: str) -> tuple[int, int, int]:
    """Split-K for a grid of ``blocks`` (sequences x KV heads) over contexts of up to ``longest`` keys: (splits, keys
    per split, the kernel's ``tokens_per_split`` argument: that, or ``-minimum`` when each sequence cuts its own
    context, :func:`_split_keys`). ``tokens_per_split`` None: :func:`split_size` picks it on a GPU (none
    elsewhere); ``dynamic_split``: as :func:`paged_attention_warp`'s."""
    picked = tokens_per_split is None  # split_size's choice, not the caller's
    if picked and where == "gpu":
        tokens_per_split = split_size(blocks, longest, resident_blocks(kernel, threads, device))
    splits = 1 if tokens_per_split is None else cdiv(longest, tokens_per_split)
    tokens_per_split = max(longest, 1) if splits == 1 else tokens_per_split
    dynamic = longest >= DYNAMIC_SPLIT_MIN_KEYS if DYNAMIC_SPLIT is None else DYNAMIC_SPLIT
    least = (MIN_SPLIT if dynamic and picked else 0) if dynamic_split is None else dynamic_split
    return splits, tokens_per_split, -least if least > 0 and splits > 1 else tokens_per_split


def paged_attention_warp(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, *, scale: float | None = None, out: torch.Tensor | None = None,
                         tokens_per_split: int | None = None, max_context_len: int | None = None,
                         warps: int | None = None, unroll: int | None = None, wide: bool = True,
                         fp8_cvt: bool | None = None, fp8_half2: bool | None = None,
                         fused_merge: bool | None = None, dynamic_split: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Decode attention of ``q`` (seqs, q_heads, d) over each sequence's paged K/V; returns ``out``.

    ``max_context_len`` (>= every context length) avoids reading ``context_lens`` back from the GPU (a CUDA
    graph needs it fixed). ``tokens_per_split``: keys per split-K chunk; None lets :func:`split_size` pick one
    on the GPU (when the grid of (seqs x kv_heads) blocks is too small to fill the machine, or ``MAX_SPLIT``
    is set). ``warps`` per block and ``unroll``
    (tokens per lane group per trip) default to the module's ``WARPS`` and ``UNROLL16`` (``WARPS_4B`` and
    ``UNROLL`` for the 4-byte kernel), read at call time. An fp8 ``kv_cache`` (``torch.float8_e4m3fn``, e4m3
    bytes: ``kernels._fp8``) takes bf16 queries and the 16-byte kernel; ``wide`` does not apply to it. ``fp8_cvt``:
    widen its bytes by the hardware's conversion (sm_89+) or by masks and shifts; None: ``FP8_CVT`` where the GPU
    has it. ``fp8_half2``: multiply-add the widened values as fp16 pairs; None: ``FP8_HALF2``. ``fused_merge``
    (the 16-byte kernel): split-K partial results merged by the kernel's last block, not a second kernel; None:
    ``FUSED_MERGE``. ``dynamic_split`` (split-K with the fused merge): each sequence cuts its own context into the
    grid's splits, chunks of at least this many keys (:func:`_split_keys`); 0: chunks of ``tokens_per_split``; None:
    ``MIN_SPLIT`` where ``DYNAMIC_SPLIT`` says so (for ``max_context_len``) and the split size is picked here, else 0.
    """
    _check(q, kv_cache, block_tables, context_lens, fp8=True)
    seqs, q_heads, dim = q.shape
    kv_heads = kv_cache.shape[3]
    scale = dim ** -0.5 if scale is None else float(scale)
    out = torch.empty_like(q) if out is None else out
    where = resolve_backend(backend, q, kv_cache, block_tables, context_lens, out)
    if where == "torch":
        return out.copy_(paged_attention_ref(q, kv_cache, block_tables, context_lens, scale))
    if seqs == 0:
        return out
    longest = int(context_lens.max()) if max_context_len is None else max_context_len
    fp8 = kv_cache.dtype == FP8
    if fp8 or (wide and q.dtype == torch.bfloat16 and dim % 8 == 0 and 32 % (dim // 8) == 0):  # 16-byte loads
        warps = fit_warps(q_heads // kv_heads, dim, WARPS if warps is None else warps, fp8)
        cvt = fp8 and (FP8_CVT and where == "gpu" and _has_cvt(q.device.index or 0) if fp8_cvt is None else fp8_cvt)
        half2 = fp8 and (FP8_HALF2 if fp8_half2 is None else fp8_half2)
        fused = FUSED_MERGE if fused_merge is None else fused_merge
        build = (q_heads // kv_heads, dim, warps, UNROLL16 if unroll is None else unroll, fp8, cvt, half2, fused,
                 HEADS_FIRST)
        kernel = _kernel16(*build)
        q_in, kv_in = q.view(torch.complex128), kv_cache.view(torch.uint8 if fp8 else q.dtype).view(torch.complex128)
    else:
        warps, fused = WARPS_4B if warps is None else warps, None  # None: the 4-byte kernel (no counters argument)
        kernel = _kernel(q_heads // kv_heads, dim, warps, UNROLL if unroll is None else unroll)
        q_in, kv_in = q, kv_cache
    splits, tokens_per_split, keys = plan_splits(seqs * kv_heads, longest, tokens_per_split, dynamic_split, kernel,
                                                 warps * 32, q.device, where)
    partial, m, l = split_buffers(q, splits)
    if keys < 0 and fused:
        kernel = _kernel16(*build, True)  # its build with _split_keys
    else:
        keys = tokens_per_split
    args = (q_in, kv_in, block_tables, context_lens, numba.float32(scale), out, partial, m, l, keys, splits)
    if fused is not None:  # the 16-byte kernel takes the fused merge's counters (a placeholder when unused)
        args += (_counters(q.device, seqs, kv_heads) if fused and splits > 1 else _NO_COUNTERS(q.device),)
    heads_first = fused is not None and HEADS_FIRST  # the 16-byte kernel's grid: (kv_heads, seqs, splits)
    launch(kernel, (kv_heads, seqs, splits) if heads_first else (seqs, kv_heads, splits), warps * 32, *args,
           backend=where)
    if splits > 1 and not fused:
        merge_splits(partial, m, l, context_lens, tokens_per_split, out, where)
    return out


@functools.cache
def _NO_COUNTERS(device: torch.device) -> torch.Tensor:  # noqa: N802 -- a constant per device
    return torch.zeros(1, 1, dtype=torch.int32, device=device)


def _main() -> None:
    from kernels._timing import graph_time
    from kernels.paged_attention import paged_attention

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    cases = [(s, 16, 8, 128, c) for s in (1, 32, 256) for c in (512, 2048, 8192)] if on_gpu else [(2, 4, 2, 64, 40)]
    for seqs, qh, kvh, dim, ctx in cases:
        bs = 16
        nb = seqs * cdiv(ctx, bs)
        cache = torch.randn(nb, 2, bs, kvh, dim, device=device).to(torch.bfloat16 if on_gpu else torch.float32)
        tables = torch.randperm(nb, device=device).to(torch.int32).view(seqs, -1)
        lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(seqs, qh, dim, device=device).to(cache.dtype)
        got = paged_attention_warp(q, cache, tables, lens)
        err = (got.float() - paged_attention_ref(q, cache, tables, lens).float()).abs().max().item()
        line = f"seqs {seqs:3d} ctx {ctx:6d} |err| {err:.1e}"
        if on_gpu:
            kv_bytes = 2 * seqs * ctx * kvh * dim * q.element_size()
            for warps, wide in ((4, True), (8, True), (2, True), (4, False)):
                us = graph_time(lambda: paged_attention_warp(q, cache, tables, lens, max_context_len=ctx, warps=warps,
                                                             wide=wide)).median_us
                line += f" | w{warps}{'x16B' if wide else 'x2B'} {us:7.1f} us {kv_bytes / us / 4.3e6:4.0%}"
            v1 = graph_time(lambda: paged_attention(q, cache, tables, lens, max_context_len=ctx)).median_us
            line += f" | v1 {v1:8.1f} us"
        print(line, flush=True)


if __name__ == "__main__":
    _main()
