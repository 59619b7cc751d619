"""Paged decode attention: one new query token per sequence, over the K and V its block table points to.

    q, out:       (seqs, q_heads, head_dim)                      this step's query (after RoPE)
    kv_cache:     (num_blocks, 2, block_size, kv_heads, head_dim) one layer's pool (minivllm.cache.kv_cache)
    block_tables: (seqs, width) int32                            token p of seq s: block_tables[s, p // block_size]
    context_lens: (seqs,) int32                                  keys 0 .. context_len - 1 (the new one included)

One CUDA block per (sequence, KV head, split). The ``group = q_heads / kv_heads`` query heads that share
a KV head (GQA) are handled by the same block, so each K and V row is read from memory once for all of
them. The keys are walked in tiles of ``blockDim.x`` tokens, three steps per tile:

1. scores: thread ``t`` looks up its token's block, reads its K row and computes ``q_g . k * scale`` for
   every query head ``g`` of the group (shared memory ``scores[g, t]``);
2. online softmax: thread ``g`` takes the tile's max, rescales its running sum by ``exp(m_old - m_new)``
   and turns its scores into probabilities ``exp(s - m_new)`` (fp32 throughout);
3. values: thread ``t`` owns output elements ``d = t, t + blockDim.x, ...``: it rescales its accumulators
   and adds ``p[g, i] * v[i, d]`` for every token ``i`` of the tile (V rows read once, coalesced).

**Split-K** (long contexts, few sequences): the keys are cut into ``tokens_per_split`` chunks, one block
each, which write an un-merged result (normalised output, running max ``m`` and sum ``l``) in fp32;
``paged_attention_reduce_kernel`` merges them: ``out = sum_s l_s e^(m_s - M) o_s / sum_s l_s e^(m_s - M)``.

Limits: head_dim <= 128, GQA group <= 8, float32/float16/bfloat16 (q, cache and out alike). Step 1 reads a
K row per thread (strided across threads, not coalesced) and step 2 runs on ``group`` threads only; the
numba version is written to be read and to run in the simulator, not tuned: vLLM's kernel splits the head
dimension over a warp per token instead. ``python -m kernels.paged_attention`` checks (and on a GPU times) it.
"""

import math

import numba
import torch
import torch.nn.functional as F
from numba import cuda

from kernels._checks import FLOAT_DTYPES, FP8, check_tensor
from kernels._launch import cdiv, launch, resolve_backend

G_MAX = 8  # query heads per KV head
D_MAX = 128  # head_dim
TILE_MAX = 128  # threads per block, = tokens per tile
DPT = 4  # output elements per thread: D_MAX / 32 (a block has at least 32 threads)
Q_SHARED = G_MAX * D_MAX  # shared/local array sizes must be plain constants for numba
S_SHARED = G_MAX * TILE_MAX
ACC_LOCAL = G_MAX * DPT
NEG_INF = -math.inf


# ----------------------------------------------------------------------------- reference
def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V, (context_len, kv_heads, head_dim) each, gathered from its blocks."""
    block_size = kv_cache.shape[2]
    blocks = block_table[:cdiv(context_len, block_size)].long()
    kv = kv_cache[blocks]  # (n_blocks, 2, block_size, kv_heads, dim)
    k = kv[:, 0].reshape(-1, *kv_cache.shape[3:])[:context_len]
    v = kv[:, 1].reshape(-1, *kv_cache.shape[3:])[:context_len]
    return k, v


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense answer key: gather each sequence's blocks, then PyTorch SDPA (fp32) with GQA."""
    seqs, q_heads, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for s in range(seqs):
        k, v = gather_kv(kv_cache, block_tables[s], int(context_lens[s]))
        group = q_heads // k.shape[1]
        k, v = (x.float().repeat_interleave(group, dim=1).transpose(0, 1) for x in (k, v))  # (q_heads, ctx, d)
        o = F.scaled_dot_product_attention(q[s].float().unsqueeze(1), k, v, scale=scale)  # (q_heads, 1, d)
        out[s] = o[:, 0].to(q.dtype)
    return out


def merge_partials(partial_out: torch.Tensor, max_logits: torch.Tensor, exp_sums: torch.Tensor) -> torch.Tensor:
    """Torch version of the split-K merge over the last split axis: (..., splits, d), (..., splits) -> (..., d)."""
    m = max_logits.amax(-1, keepdim=True)
    w = exp_sums * torch.exp(max_logits - m).nan_to_num(0.0)  # an empty split (m = -inf, l = 0) weighs 0
    return (w.unsqueeze(-1) * partial_out).sum(-2) / w.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------- kernels
@cuda.jit
def paged_attention_kernel(q, kv_cache, block_tables, context_lens, scale, out, partial_out, max_logits,
                           exp_sums, tokens_per_split):
    # partial_out: (seqs, q_heads, splits, dim) fp32; max_logits, exp_sums: (seqs, q_heads, splits)
    q_sh = cuda.shared.array(Q_SHARED, numba.float32)  # the group's queries, times scale
    scores = cuda.shared.array(S_SHARED, numba.float32)  # scores, then probabilities, of a tile
    tile_block = cuda.shared.array(TILE_MAX, numba.int32)  # the physical block of each token of the tile
    m_sh = cuda.shared.array(G_MAX, numba.float32)
    l_sh = cuda.shared.array(G_MAX, numba.float32)
    alpha_sh = cuda.shared.array(G_MAX, numba.float32)
    acc = cuda.local.array(ACC_LOCAL, numba.float32)  # acc[g * DPT + k]: element tid + k * threads

    seq = cuda.blockIdx.x
    kvh = cuda.blockIdx.y
    split = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    dim = q.shape[2]
    group = q.shape[1] // kv_cache.shape[3]
    block_size = kv_cache.shape[2]
    start = split * tokens_per_split
    end = min(context_lens[seq], start + tokens_per_split)

    for i in range(tid, group * dim, threads):
        g = i // dim
        q_sh[g * D_MAX + i % dim] = numba.float32(q[seq, kvh * group + g, i % dim]) * scale
    if tid < group:
        m_sh[tid] = NEG_INF
        l_sh[tid] = 0.0
    for k in range(ACC_LOCAL):
        acc[k] = 0.0
    cuda.syncthreads()

    tile = start
    while tile < end:  # the same trip count for every thread of the block (barriers inside)
        n = min(threads, end - tile)
        # 1. scores: one token per thread, all query heads of the group
        if tid < n:
            j = tile + tid
            b = block_tables[seq, j // block_size]
            o = j % block_size
            tile_block[tid] = b
            for g in range(group):
                s = numba.float32(0.0)
                for d in range(dim):
                    s += q_sh[g * D_MAX + d] * numba.float32(kv_cache[b, 0, o, kvh, d])
                scores[g * TILE_MAX + tid] = s
        cuda.syncthreads()
        # 2. online softmax: one query head per thread
        if tid < group:
            m_old = m_sh[tid]
            m_new = m_old
            for i in range(n):
                m_new = max(m_new, scores[tid * TILE_MAX + i])
            alpha = math.exp(m_old - m_new)  # 0 on the first tile (m_old = -inf)
            total = numba.float32(0.0)
            for i in range(n):
                p = math.exp(scores[tid * TILE_MAX + i] - m_new)
                scores[tid * TILE_MAX + i] = p
                total += p
            l_sh[tid] = l_sh[tid] * alpha + total
            m_sh[tid] = m_new
            alpha_sh[tid] = alpha
        cuda.syncthreads()
        # 3. values: each thread its output elements, all query heads of the group
        for k in range(DPT):
            d = tid + k * threads
            if d < dim:
                for g in range(group):
                    acc[g * DPT + k] *= alpha_sh[g]
                for i in range(n):
                    v = numba.float32(kv_cache[tile_block[i], 1, (tile + i) % block_size, kvh, d])
                    for g in range(group):
                        acc[g * DPT + k] += scores[g * TILE_MAX + i] * v
        cuda.syncthreads()  # before the next tile overwrites scores and tile_block
        tile += threads

    splits = cuda.gridDim.z
    for k in range(DPT):
        d = tid + k * threads
        if d < dim:
            for g in range(group):
                l = l_sh[g]
                value = acc[g * DPT + k] / l if l > 0.0 else numba.float32(0.0)
                if splits == 1:
                    out[seq, kvh * group + g, d] = value
                else:
                    partial_out[seq, kvh * group + g, split, d] = value
    if splits > 1 and tid < group:
        max_logits[seq, kvh * group + tid, split] = m_sh[tid]
        exp_sums[seq, kvh * group + tid, split] = l_sh[tid]


@cuda.jit
def paged_attention_reduce_kernel(partial_out, max_logits, exp_sums, context_lens, tokens_per_split, out):
    # one block per (sequence, query head); threads over head_dim
    seq = cuda.blockIdx.x
    h = cuda.blockIdx.y
    used = (context_lens[seq] + tokens_per_split - 1) // tokens_per_split  # splits that saw keys
    m = numba.float32(NEG_INF)
    for s in range(used):
        m = max(m, max_logits[seq, h, s])
    total = numba.float32(0.0)
    for s in range(used):
        total += exp_sums[seq, h, s] * math.exp(max_logits[seq, h, s] - m)
    for d in range(cuda.threadIdx.x, out.shape[2], cuda.blockDim.x):
        acc = numba.float32(0.0)
        for s in range(used):
            acc += partial_out[seq, h, s, d] * (exp_sums[seq, h, s] * math.exp(max_logits[seq, h, s] - m))
        out[seq, h, d] = acc / total


_TYPES = ("float32", "float16", "bfloat16")
SIGNATURES = {
    paged_attention_kernel: [
        f"void({t}[:, :, ::1], {t}[:, :, :, :, ::1], int32[:, ::1], int32[::1], float32, {t}[:, :, ::1], "
        f"float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], int64)" for t in _TYPES],
    paged_attention_reduce_kernel: [
        f"void(float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], int32[::1], int64, {t}[:, :, ::1])"
        for t in _TYPES],
}


# ----------------------------------------------------------------------------- launcher
def _check(q, kv_cache, block_tables, context_lens, fp8: bool = False) -> None:
    """``fp8``: the caller also reads an fp8 (e4m3) pool with bf16 queries (``paged_attention_warp`` does)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    seqs, q_heads, dim = q.shape
    fp8 = fp8 and q.dtype == torch.bfloat16
    check_tensor("kv_cache", kv_cache, dtypes=(q.dtype, FP8) if fp8 else (q.dtype,), ndim=5, device=q.device)
    if kv_cache.dtype == FP8 and (dim % 16 or 32 % (dim // 16)):
        raise ValueError(f"an fp8 kv_cache needs head_dim / 16 to divide 32 (16, 32, 64, 128, ...), got {dim}")
    num_blocks, two, block_size, kv_heads, cache_dim = kv_cache.shape
    if two != 2 or cache_dim != dim:
        raise ValueError(f"kv_cache must be (num_blocks, 2, block_size, kv_heads, {dim}), got {tuple(kv_cache.shape)}")
    if q_heads % kv_heads or q_heads // kv_heads > G_MAX:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}), at most {G_MAX} times it")
    if dim > D_MAX:
        raise ValueError(f"head_dim must be at most {D_MAX}, got {dim}")
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), ndim=2, device=q.device)
    if block_tables.shape[0] != seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {seqs} sequences")
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), shape=(seqs,), device=q.device)
    if q.device.type == "cpu" and seqs:  # on a GPU these checks would cost a synchronisation
        if context_lens.min() < 1 or context_lens.max() > block_tables.shape[1] * block_size:
            raise ValueError(f"context_lens must be in 1..{block_tables.shape[1] * block_size} "
                             f"(block table width x block_size)")
        used = torch.arange(block_tables.shape[1]) < ((context_lens + block_size - 1) // block_size)[:, None].long()
        if ((block_tables < 0) | (block_tables >= num_blocks))[used].any():
            raise ValueError(f"block_tables must hold blocks in 0..{num_blocks - 1} for every token in context")


def split_buffers(q: torch.Tensor, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-K partial results (fp32): outputs (seqs, q_heads, splits, d), max logits and exp sums
    (seqs, q_heads, splits); one-element placeholders when there is a single split."""
    if splits == 1:
        partial = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        m = torch.empty((1, 1, 1), dtype=torch.float32, device=q.device)
        return partial, m, m
    seqs, q_heads, dim = q.shape
    partial = torch.empty((seqs, q_heads, splits, dim), dtype=torch.float32, device=q.device)
    m = torch.empty((seqs, q_heads, splits), dtype=torch.float32, device=q.device)
    return partial, m, torch.empty_like(m)


def merge_splits(partial: torch.Tensor, m: torch.Tensor, l: torch.Tensor, context_lens: torch.Tensor,
                 tokens_per_split: int, out: torch.Tensor, where: str) -> None:
    """Launch :func:`paged_attention_reduce_kernel`: one block per (sequence, query head)."""
    seqs, q_heads, dim = out.shape
    launch(paged_attention_reduce_kernel, (seqs, q_heads), 32 if where == "simulator" else min(dim, 128),
           partial, m, l, context_lens, tokens_per_split, out, backend=where)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                    *, scale: float | None = None, out: torch.Tensor | None = None,
                    tokens_per_split: int | None = None, max_context_len: int | None = None,
                    threads: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Decode attention of ``q`` (seqs, q_heads, d) over each sequence's paged K/V; returns ``out``.

    ``tokens_per_split``: keys per split-K chunk (None: no split on CPU; on the GPU split when the
    longest context is over 1024 tokens and the grid is too small to fill the machine).
    ``max_context_len`` (>= every context length) saves reading ``context_lens`` back from the GPU; a CUDA
    graph needs it fixed, and may then replay with any context lengths up to it.
    """
    _check(q, kv_cache, block_tables, context_lens)
    seqs, q_heads, dim = q.shape
    kv_heads = kv_cache.shape[3]
    scale = dim ** -0.5 if scale is None else float(scale)
    out = torch.empty_like(q) if out is None else out
    check_tensor("out", out, dtypes=(q.dtype,), shape=tuple(q.shape), device=q.device)
    where = resolve_backend(backend, q, kv_cache, block_tables, context_lens, out)
    if where == "torch":
        return out.copy_(paged_attention_ref(q, kv_cache, block_tables, context_lens, scale))
    if seqs == 0:
        return out
    threads = threads or (32 if where == "simulator" else 128)
    if not (32 <= threads <= TILE_MAX and threads % 32 == 0):
        raise ValueError(f"threads must be a multiple of 32 in [32, {TILE_MAX}], got {threads}")
    longest = int(context_lens.max()) if max_context_len is None else max_context_len
    if tokens_per_split is None and where == "gpu" and longest > 1024 and seqs * kv_heads < 2 * 132:
        tokens_per_split = 512
    if tokens_per_split is not None and tokens_per_split <= 0:
        raise ValueError(f"tokens_per_split must be positive, got {tokens_per_split}")
    splits = 1 if tokens_per_split is None else cdiv(longest, tokens_per_split)
    tokens_per_split = longest if splits == 1 else tokens_per_split
    partial, m, l = split_buffers(q, splits)
    launch(paged_attention_kernel, (seqs, kv_heads, splits), threads, q, kv_cache, block_tables, context_lens,
           numba.float32(scale), out, partial, m, l, tokens_per_split, backend=where)
    if splits > 1:
        merge_splits(partial, m, l, context_lens, tokens_per_split, out, where)
    return out


def _main() -> None:
    from kernels._timing import graph_time

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    cases = [(32, 16, 8, 128, 2048, None), (4, 16, 8, 128, 16384, None)] if on_gpu else [(2, 4, 2, 64, 40, None),
                                                                                            (1, 4, 2, 64, 40, 16)]
    for dtype in FLOAT_DTYPES:
        for seqs, qh, kvh, dim, ctx, split in cases:
            bs = 16
            nb = seqs * cdiv(ctx, bs)
            cache = torch.randn(nb, 2, bs, kvh, dim, device=device).to(dtype)
            tables = torch.randperm(nb, device=device).to(torch.int32).view(seqs, -1)
            lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(seqs, qh, dim, device=device).to(dtype)
            got = paged_attention(q, cache, tables, lens, tokens_per_split=split)
            err = (got.float() - paged_attention_ref(q, cache, tables, lens).float()).abs().max().item()
            line = f"{str(dtype)[6:]:9s} seqs {seqs:3d} ctx {ctx:6d} |err| {err:.1e}"
            if on_gpu:
                us = graph_time(lambda: paged_attention(q, cache, tables, lens, max_context_len=ctx)).median_us
                kv_bytes = 2 * seqs * ctx * kvh * dim * q.element_size()
                line += f"  {us:8.1f} us  {kv_bytes / us / 1e3:6.0f} GB/s of KV"
            print(line)


if __name__ == "__main__":
    _main()
