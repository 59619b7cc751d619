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
x 128): 3.3x faster than version 1, but only ~1 TB/s (24% of HBM) at batch 256: each warp waits on one
row at a time. Issuing the loads of ``unroll`` tokens before using them was slower still (16% at 4
tokens: the registers it takes cost more warps than the loads in flight gain). The score ``q_g . k`` is a sum over the
lanes: five ``shfl_xor`` steps leave it in every lane. Each warp keeps its own online softmax (running
max ``m``, sum ``l``, accumulator in registers) for each of the ``group`` query heads that share the KV
head, so K and V are read once for the whole group. At the end the warps' states are merged through
shared memory, exactly like split-K partial results (``out = sum_w l_w e^(m_w - M) acc_w / sum_w ...``).

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

from kernels._launch import cdiv, launch, resolve_backend
from kernels.paged_attention import _check, paged_attention_ref, paged_attention_reduce_kernel

WARPS = 4  # warps per block
UNROLL = 1  # tokens per warp per trip; 4 and 8 measured slower on the H200 (more registers, fewer warps)
NEG_INF = -math.inf
FULL_MASK = 0xFFFFFFFF


@functools.cache
def _kernel(group: int, dim: int, warps: int, unroll: int = 4):
    """The kernel for one (group, head_dim, warps): constants, so loops unroll and arrays live in registers."""
    epl = (dim + 31) // 32  # elements per lane
    gd = group * epl
    width = epl * 32  # lanes x elements per lane
    rows = unroll * epl  # K (or V) elements a lane holds per trip

    @cuda.jit(fastmath=True)
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

        seq, kvh, split = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid = cuda.threadIdx.x
        lane, warp = tid % 32, tid // 32
        block_size = kv_cache.shape[2]
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
                    b = block_tables[seq, t // block_size]
                    o = t % block_size
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
        for i in range(tid, group * dim, warps * 32):
            g, d = i // dim, i % dim
            big = numba.float32(NEG_INF)
            for w in range(warps):
                big = max(big, sm_m[w, g])
            num = numba.float32(0.0)
            den = numba.float32(0.0)
            for w in range(warps):
                if sm_l[w, g] > 0.0:  # a warp that saw no token adds nothing (and no NaN)
                    e = math.exp(sm_m[w, g] - big)
                    num += sm_acc[w, g, d] * e
                    den += sm_l[w, g] * e
            value = num / den if den > 0.0 else numba.float32(0.0)
            h = kvh * group + g
            if num_splits == 1:
                out[seq, h, d] = value
            else:
                partial_out[seq, h, split, d] = value
                if d == 0:
                    max_logits[seq, h, split] = big
                    exp_sums[seq, h, split] = den

    return kernel


_TYPES = ("float32", "float16", "bfloat16")
SIGNATURES = {  # the shapes the course's models launch: Qwen3 (group 2, head_dim 128), SmolLM2 (3, 64)
    _kernel(group, dim, WARPS): [
        f"void({t}[:, :, ::1], {t}[:, :, :, :, ::1], int32[:, ::1], int32[::1], float32, {t}[:, :, ::1], "
        f"float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], int64, int64)" for t in _TYPES]
    for group, dim in ((2, 128), (3, 64))
}


def paged_attention_warp(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, *, scale: float | None = None, out: torch.Tensor | None = None,
                         tokens_per_split: int | None = None, max_context_len: int | None = None,
                         warps: int = WARPS, unroll: int = UNROLL, backend: str = "auto") -> torch.Tensor:
    """Decode attention of ``q`` (seqs, q_heads, d) over each sequence's paged K/V; returns ``out``.

    ``max_context_len`` (>= every context length) avoids reading ``context_lens`` back from the GPU (a CUDA
    graph needs it fixed). ``tokens_per_split``: keys per split-K chunk; None picks one on the GPU when the
    grid of (seqs x kv_heads) blocks is too small to fill the machine.
    """
    _check(q, kv_cache, block_tables, context_lens)
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
    if tokens_per_split is None and where == "gpu" and seqs * kv_heads < 4 * 132 and longest > 128:
        tokens_per_split = max(128, cdiv(longest, cdiv(4 * 132, seqs * kv_heads)))  # about 4 blocks per SM
    splits = 1 if tokens_per_split is None else cdiv(longest, tokens_per_split)
    tokens_per_split = longest if splits == 1 else tokens_per_split
    if splits == 1:
        partial = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        m = l = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
    else:
        partial = torch.empty((seqs, q_heads, splits, dim), dtype=torch.float32, device=q.device)
        m = torch.empty((seqs, q_heads, splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
    kernel = _kernel(q_heads // kv_heads, dim, warps, unroll)
    launch(kernel, (seqs, kv_heads, splits), warps * 32, q, kv_cache, block_tables, context_lens,
           numba.float32(scale), out, partial, m, l, tokens_per_split, splits, backend=where)
    if splits > 1:
        launch(paged_attention_reduce_kernel, (seqs, q_heads), 32 if where == "simulator" else min(dim, 128),
               partial, m, l, context_lens, tokens_per_split, out, backend=where)
    return out


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
            for warps, unroll in ((4, 1), (8, 1), (4, 2), (2, 2)):
                us = graph_time(lambda: paged_attention_warp(q, cache, tables, lens, max_context_len=ctx, warps=warps,
                                                             unroll=unroll)).median_us
                line += f" | w{warps}u{unroll} {us:7.1f} us {kv_bytes / us / 4.3e6:4.0%}"
            v1 = graph_time(lambda: paged_attention(q, cache, tables, lens, max_context_len=ctx)).median_us
            line += f" | v1 {v1:8.1f} us"
        print(line, flush=True)


if __name__ == "__main__":
    _main()
