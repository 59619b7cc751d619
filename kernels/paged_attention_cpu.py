"""Paged decode attention on the CPU: a numba ``@njit(parallel=True)`` kernel that reads the block table.

    q:            (seqs, q_heads, d)                          one query per decoding sequence
    kv_cache:     (num_blocks, 2, block_size, kv_heads, d)     one layer's pool (minivllm.cache.kv_cache)
    block_tables: (seqs, width) int32;  context_lens: (seqs,) int32
    out:          (seqs, q_heads, d)

One parallel job per (sequence, kv head): it walks the sequence's context token by token through its
block table, computes the scores ``q·k / sqrt(d)`` of the query heads that share that kv head (GQA: query
head ``h`` reads kv head ``h // (q_heads // kv_heads)``), a softmax (max first, so no overflow), and the
weighted sum of V. Nothing is copied: the reference (and the engine's old CPU path) gathers every
sequence's pages into a padded ``(seqs, kv_heads, max_context, d)`` tensor per layer, which at batch 32
moves ~8 MB per layer.

Limits: float32 only, CPU only (GPUs take ``kernels.paged_attention_warp``), no sliding window or ALiBi.
The first call compiles (~2 s, then cached on disk). ``python -m kernels.paged_attention_cpu`` checks and times it.
"""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange


# ----------------------------------------------------------------------------- reference
def paged_decode_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor:
    """Gather each sequence's pages, then masked SDPA: (seqs, q_heads, d)."""
    bs = kv_cache.shape[2]
    width = -(-int(context_lens.max()) // bs)
    pages = kv_cache[block_tables[:, :width].clamp(min=0).long()]  # (n, width, 2, bs, kv_heads, d)
    k = pages[:, :, 0].flatten(1, 2).transpose(1, 2)  # (n, kv_heads, width * bs, d)
    v = pages[:, :, 1].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2])[None, :] < context_lens[:, None]  # (n, keys)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    return out[:, :, 0]


# ----------------------------------------------------------------------------- kernel
@njit(parallel=True, fastmath=True, cache=True)
def _paged_decode_kernel(q, kv, tables, lens, scale, out):  # pragma: no cover - compiled
    n, heads, dim = q.shape
    block_size, kv_heads = kv.shape[2], kv.shape[3]
    group = heads // kv_heads
    for job in prange(n * kv_heads):  # one (sequence, kv head): its K and V rows are read once for the group
        s, kh = job // kv_heads, job % kv_heads
        length = lens[s]
        scores = np.empty((group, length), np.float32)
        best = np.full(group, -np.inf, np.float32)
        for t in range(length):
            blk, off = tables[s, t // block_size], t % block_size
            for g in range(group):
                h = kh * group + g
                dot = np.float32(0.0)
                for e in range(dim):
                    dot += q[s, h, e] * kv[blk, 0, off, kh, e]
                dot *= scale
                scores[g, t] = dot
                best[g] = max(best[g], dot)
        for g in range(group):
            total = np.float32(0.0)
            for t in range(length):
                p = np.exp(scores[g, t] - best[g])
                scores[g, t] = p
                total += p
            inv = np.float32(1.0) / total
            for t in range(length):
                scores[g, t] *= inv
            for e in range(dim):
                out[s, kh * group + g, e] = 0.0
        for t in range(length):
            blk, off = tables[s, t // block_size], t % block_size
            for g in range(group):
                h = kh * group + g
                p = scores[g, t]
                for e in range(dim):
                    out[s, h, e] += p * kv[blk, 1, off, kh, e]


# ----------------------------------------------------------------------------- launcher
def paged_decode_cpu(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor:
    """Decode attention of ``q`` over each sequence's paged context; see the module docstring for shapes."""
    if q.is_cuda or kv_cache.is_cuda:
        raise ValueError("paged_decode_cpu runs on CPU tensors; a GPU takes kernels.paged_attention_warp")
    if q.dtype != torch.float32 or kv_cache.dtype != torch.float32:
        raise TypeError(f"float32 only, got q {q.dtype} and kv_cache {kv_cache.dtype}")
    if q.dim() != 3 or kv_cache.dim() != 5 or q.shape[2] != kv_cache.shape[4] or q.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"shapes q {tuple(q.shape)} and kv_cache {tuple(kv_cache.shape)} do not fit together")
    if block_tables.shape[0] != q.shape[0] or context_lens.shape[0] != q.shape[0]:
        raise ValueError("block_tables and context_lens need one row per query")
    out = torch.empty_like(q)
    _paged_decode_kernel(q.contiguous().numpy(), kv_cache.contiguous().numpy(),
                         block_tables.to(torch.int32).contiguous().numpy(),
                         context_lens.to(torch.int32).contiguous().numpy(),
                         np.float32(1.0 / math.sqrt(q.shape[2])), out.numpy())
    return out


def _demo(seqs: int = 32, context: int = 160, layers: int = 30) -> None:
    torch.manual_seed(0)
    bs, heads, kv_heads, d = 16, 9, 3, 64
    width = -(-context // bs)
    kv = torch.randn(seqs * width + 1, 2, bs, kv_heads, d)
    tables = torch.randperm(seqs * width)[: seqs * width].reshape(seqs, width).int() + 1
    lens = torch.randint(context // 2, context + 1, (seqs,), dtype=torch.int32)
    q = torch.randn(seqs, heads, d)
    ref, got = paged_decode_ref(q, kv, tables, lens), paged_decode_cpu(q, kv, tables, lens)
    print(f"max |diff| vs gather + SDPA: {(ref - got).abs().max().item():.2e}")
    for name, fn in (("gather + SDPA", paged_decode_ref), ("numba kernel", paged_decode_cpu)):
        start = time.perf_counter()
        for _ in range(layers):
            fn(q, kv, tables, lens)
        print(f"{name:14s} {(time.perf_counter() - start) / layers * 1e3:.3f} ms per layer "
              f"({seqs} seqs, contexts <= {context})")


if __name__ == "__main__":
    _demo()
