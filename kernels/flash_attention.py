"""Prefill attention, tiled with an online softmax ("flash attention"): causal, GQA, variable-length batches.

The batch is packed: ``q`` is ``(total_q, n_q_heads, head_dim)``, the tokens of every sequence one after
another, and ``cu_seqlens_q`` (int32, ``batch + 1`` prefix sums) says where each sequence starts. Two sources
of keys and values:

* **dense** (:func:`flash_attention`): ``k``, ``v`` are ``(total_k, n_kv_heads, head_dim)``, packed the same
  way (``cu_seqlens_k``);
* **paged** (:func:`flash_attention_paged`): the keys and values of each sequence's whole context sit in the
  paged KV pool ``kv_cache`` of shape ``(num_blocks, 2, block_size, n_kv_heads, head_dim)`` (K at index 0,
  V at 1, the layout of ``minivllm.cache``), found through a padded ``block_tables`` ``(batch, max_blocks)``
  int32 and ``context_lens`` (batch,) int32. The query tokens are the LAST ``q_len`` tokens of the context
  (their K/V already stored there): a prefix-cache hit or a chunk of a chunked prefill.

Causal masking is aligned to the end (as in flash-attn and vLLM): query ``i`` of a sequence with ``q_len``
queries and ``k_len`` keys sees keys ``j <= i + (k_len - q_len)``.

The algorithm, per (query tile, head, sequence) block: each thread owns one query row (pre-scaled, in
registers) and an fp32 accumulator. The block walks the keys in tiles: all threads load the tile's K and V
into shared memory (as fp32), then each thread scores its row against the tile, updates its running max
``m`` and normalizer ``l`` (the online softmax: rescale the old state by ``exp(m_old - m_new)``) and adds
``p @ V_tile`` to its accumulator. The (seq, seq) score matrix never exists in memory. GQA: query head ``h``
reads kv head ``h // (n_q_heads // n_kv_heads)``.

Limits, honestly: correct, not fast. Every product is a scalar fp32 FMA (no tensor cores, which is where
``torch.nn.functional.scaled_dot_product_attention``'s flash backend gets its speed), the accumulator is a
local array (spills to local memory for head_dim 128), the K/V tiles are loaded one value per thread-step and
each kv head's tile is loaded once per *query* head (no sharing across a GQA group). head_dim up to 128.
The launchers read ``cu_seqlens``/``context_lens`` on the host to check them (a device sync): fine for prefill,
which is not captured in a CUDA graph. ``python -m kernels.flash_attention`` checks the kernels and times them.
"""

import math

import numba
import torch
import torch.nn.functional as F
from numba import cuda

from kernels._checks import FLOAT_DTYPES, check_tensor
from kernels._launch import cdiv, launch, resolve_backend

MAX_HEAD_DIM = 128  # sizes the per-thread registers and the shared-memory tiles
MAX_TILE_N = 32  # keys per shared-memory tile, at most (2 tiles x 32 x 128 x 4 B = 32 KiB of shared memory)
NEG_INF = -math.inf


# ----------------------------------------------------------------------------- references
def _causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) bool, True where query i may see key j: j <= i + (k_len - q_len)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, scale: float | None = None, causal: bool = True) -> torch.Tensor:
    """Per sequence: torch SDPA in fp32 (fp64 stays fp64), end-aligned causal mask, GQA; result in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].to(acc).transpose(0, 1)  # (n_q_heads, q_len, head_dim)
        ks = k[ck[b]:ck[b + 1]].to(acc).transpose(0, 1).repeat_interleave(group, dim=0)  # (n_q_heads, k_len, d)
        vs = v[ck[b]:ck[b + 1]].to(acc).transpose(0, 1).repeat_interleave(group, dim=0)
        mask = _causal_mask(qs.shape[1], ks.shape[1], q.device) if causal else None
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)  # (n_q_heads, q_len, d)
        out[cq[b]:cq[b + 1]] = o.transpose(0, 1).to(q.dtype)
    return out


def gather_paged_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense (k, v, cu_seqlens_k) of every sequence's context, read block by block from the pool."""
    block_size = kv_cache.shape[2]
    ks, vs = [], []
    for b, n in enumerate(context_lens.tolist()):
        blocks = block_tables[b, :cdiv(n, block_size)].long()
        kv = kv_cache[blocks]  # (n_blocks, 2, block_size, n_kv_heads, head_dim)
        ks.append(kv[:, 0].flatten(0, 1)[:n])
        vs.append(kv[:, 1].flatten(0, 1)[:n])
    cu = torch.zeros(len(ks) + 1, dtype=torch.int32, device=kv_cache.device)
    cu[1:] = torch.cumsum(context_lens.to(kv_cache.device), 0)
    return torch.cat(ks), torch.cat(vs), cu


def flash_attention_paged_ref(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: torch.Tensor,
                              scale: float | None = None) -> torch.Tensor:
    """Gather each sequence's context from the pool, then :func:`flash_attention_ref` (causal)."""
    k, v, cu_seqlens_k = gather_paged_kv(kv_cache, block_tables, context_lens)
    return flash_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal=True)


def merge_softmax_states(a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                         b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The online softmax's merge: states (m, l, o) of two parts of the keys -> the state of both.

    m, l: (rows,) running max and sum of exp(score - m); o: (rows, d) the unnormalized output
    sum(exp(score - m) * v). A row that saw no key in a part has m = -inf, l = 0, o = 0 there.
    """
    m = torch.maximum(a[0], b[0])
    alpha, beta = torch.exp(a[0] - m), torch.exp(b[0] - m)  # each part rescaled to the common max
    return m, a[1] * alpha + b[1] * beta, a[2] * alpha[:, None] + b[2] * beta[:, None]


# ----------------------------------------------------------------------------- kernels
@cuda.jit(device=True)
def attend_tile(q_row, acc, scores, k_tile, v_tile, n_keys, head_dim, m, l):
    """One online-softmax step of one query row over the first ``n_keys`` keys of a shared-memory tile.

    q_row: (head_dim,) already times the softmax scale; acc: (head_dim,) the unnormalized output so far;
    scores: (>= n_keys,) scratch; k_tile, v_tile: (tile, head_dim) fp32. Returns the new (m, l): the running
    max and sum of exp(score - m).
    """
    tile_max = numba.float32(NEG_INF)
    for j in range(n_keys):  # the tile's scores, and their max
        s = numba.float32(0.0)
        for d in range(head_dim):
            s += q_row[d] * k_tile[j, d]
        scores[j] = s
        tile_max = max(tile_max, s)
    m_new = max(m, tile_max)
    alpha = math.exp(m - m_new)  # rescales the old state; exp(-inf) = 0 on the first tile
    l = l * alpha
    for d in range(head_dim):
        acc[d] *= alpha
    for j in range(n_keys):  # p = exp(s - m_new), l += p, acc += p * v
        p = math.exp(scores[j] - m_new)
        l += p
        for d in range(head_dim):
            acc[d] += p * v_tile[j, d]
    return m_new, l


@cuda.jit
def flash_attention_kernel(q, k, v, out, cu_seqlens_q, cu_seqlens_k, scale, causal, tile_n):
    # q, out: (total_q, n_q_heads, head_dim); k, v: (total_k, n_kv_heads, head_dim)
    # grid: (query tiles, n_q_heads, batch); block: one thread per query row of the tile
    k_tile = cuda.shared.array((MAX_TILE_N, MAX_HEAD_DIM), numba.float32)
    v_tile = cuda.shared.array((MAX_TILE_N, MAX_HEAD_DIM), numba.float32)
    q_row = cuda.local.array(MAX_HEAD_DIM, numba.float32)
    acc = cuda.local.array(MAX_HEAD_DIM, numba.float32)
    scores = cuda.local.array(MAX_TILE_N, numba.float32)
    tid = cuda.threadIdx.x
    head, seq = cuda.blockIdx.y, cuda.blockIdx.z
    kv_head = head // (q.shape[1] // k.shape[1])
    head_dim = q.shape[2]
    q_start, k_start = cu_seqlens_q[seq], cu_seqlens_k[seq]
    q_len, k_len = cu_seqlens_q[seq + 1] - q_start, cu_seqlens_k[seq + 1] - k_start
    first_row = cuda.blockIdx.x * cuda.blockDim.x
    if first_row >= q_len:
        return  # the whole block leaves before any barrier: this sequence has fewer query tiles
    row = first_row + tid
    live = row < q_len
    offset = k_len - q_len  # end-aligned causal mask: row sees keys < row + offset + 1
    limit = min(k_len, row + offset + 1) if causal else k_len  # keys this row sees
    block_limit = min(k_len, min(first_row + cuda.blockDim.x, q_len) + offset) if causal else k_len
    m = numba.float32(NEG_INF)
    l = numba.float32(0.0)
    for d in range(head_dim):
        q_row[d] = numba.float32(q[q_start + row, head, d]) * scale if live else numba.float32(0.0)
        acc[d] = numba.float32(0.0)
    for tile_start in range(0, block_limit, tile_n):  # the same trip count for every thread (barriers)
        for i in range(tid, tile_n * head_dim, cuda.blockDim.x):  # cooperative load, converted to fp32
            j, d = i // head_dim, i % head_dim
            key = tile_start + j
            if key < k_len:
                k_tile[j, d] = numba.float32(k[k_start + key, kv_head, d])
                v_tile[j, d] = numba.float32(v[k_start + key, kv_head, d])
        cuda.syncthreads()
        n_keys = min(tile_n, limit - tile_start)
        if live and n_keys > 0:
            m, l = attend_tile(q_row, acc, scores, k_tile, v_tile, n_keys, head_dim, m, l)
        cuda.syncthreads()  # every thread is done with the tile before the next load overwrites it
    if live:
        inv_l = numba.float32(1.0) / l
        for d in range(head_dim):
            out[q_start + row, head, d] = acc[d] * inv_l


@cuda.jit
def flash_attention_paged_kernel(q, kv_cache, out, cu_seqlens_q, block_tables, context_lens, scale, tile_n):
    # q, out: (total_q, n_q_heads, head_dim); kv_cache: (num_blocks, 2, block_size, n_kv_heads, head_dim)
    # block_tables: (batch, max_blocks); the queries are the last q_len of context_lens[seq] tokens
    k_tile = cuda.shared.array((MAX_TILE_N, MAX_HEAD_DIM), numba.float32)
    v_tile = cuda.shared.array((MAX_TILE_N, MAX_HEAD_DIM), numba.float32)
    q_row = cuda.local.array(MAX_HEAD_DIM, numba.float32)
    acc = cuda.local.array(MAX_HEAD_DIM, numba.float32)
    scores = cuda.local.array(MAX_TILE_N, numba.float32)
    tid = cuda.threadIdx.x
    head, seq = cuda.blockIdx.y, cuda.blockIdx.z
    kv_head = head // (q.shape[1] // kv_cache.shape[3])
    head_dim, block_size = q.shape[2], kv_cache.shape[2]
    q_start = cu_seqlens_q[seq]
    q_len, k_len = cu_seqlens_q[seq + 1] - q_start, context_lens[seq]
    first_row = cuda.blockIdx.x * cuda.blockDim.x
    if first_row >= q_len:
        return
    row = first_row + tid
    live = row < q_len
    offset = k_len - q_len  # the queries are the context's last q_len tokens
    limit = min(k_len, row + offset + 1)
    block_limit = min(k_len, min(first_row + cuda.blockDim.x, q_len) + offset)
    m = numba.float32(NEG_INF)
    l = numba.float32(0.0)
    for d in range(head_dim):
        q_row[d] = numba.float32(q[q_start + row, head, d]) * scale if live else numba.float32(0.0)
        acc[d] = numba.float32(0.0)
    for tile_start in range(0, block_limit, tile_n):
        for i in range(tid, tile_n * head_dim, cuda.blockDim.x):
            j, d = i // head_dim, i % head_dim
            key = tile_start + j
            if key < k_len:
                block = block_tables[seq, key // block_size]  # logical block -> physical block
                slot = key % block_size
                k_tile[j, d] = numba.float32(kv_cache[block, 0, slot, kv_head, d])
                v_tile[j, d] = numba.float32(kv_cache[block, 1, slot, kv_head, d])
        cuda.syncthreads()
        n_keys = min(tile_n, limit - tile_start)
        if live and n_keys > 0:
            m, l = attend_tile(q_row, acc, scores, k_tile, v_tile, n_keys, head_dim, m, l)
        cuda.syncthreads()
    if live:
        inv_l = numba.float32(1.0) / l
        for d in range(head_dim):
            out[q_start + row, head, d] = acc[d] * inv_l


_TYPES = ("float32", "float16", "bfloat16")
SIGNATURES = {
    attend_tile: ["UniTuple(float32, 2)(float32[::1], float32[::1], float32[::1], float32[:, ::1], "
                  "float32[:, ::1], int64, int64, float32, float32)"],
    flash_attention_kernel: [f"void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], int32[::1], "
                             "int32[::1], float32, boolean, int64)" for t in _TYPES],
    flash_attention_paged_kernel: [f"void({t}[:, :, ::1], {t}[:, :, :, :, ::1], {t}[:, :, ::1], int32[::1], "
                                   "int32[:, ::1], int32[::1], float32, int64)" for t in _TYPES],
}


# ----------------------------------------------------------------------------- launchers
def launch_config(backend: str) -> tuple[int, int]:
    """(query rows per block = threads, keys per shared-memory tile) for a backend.

    GPU: 64 query rows (two warps), 32 keys. Simulator (~0.2 ms per simulated thread, ~25 ms per barrier
    per block, two barriers per key tile): 16 rows and 16 keys keep tiny tests to a few seconds.
    """
    return (16, 16) if backend == "simulator" else (64, MAX_TILE_N)


def _check_qkv_common(q: torch.Tensor, n_kv_heads: int, cu_seqlens_q: torch.Tensor) -> list[int]:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    n_q_heads, head_dim = q.shape[1], q.shape[2]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if n_kv_heads < 1 or n_q_heads % n_kv_heads:
        raise ValueError(f"n_q_heads ({n_q_heads}) must be a multiple of n_kv_heads ({n_kv_heads}) for GQA")
    return _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)


def _check_cu_seqlens(name: str, cu: torch.Tensor, x: torch.Tensor) -> list[int]:
    check_tensor(name, cu, dtypes=(torch.int32,), ndim=1, device=x.device)
    if cu.numel() < 2:
        raise ValueError(f"{name} must hold batch + 1 >= 2 prefix sums, got {cu.numel()}")
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {values[:8]}...")
    if values[-1] != x.shape[0]:
        raise ValueError(f"{name}[-1] = {values[-1]} must equal the number of tokens ({x.shape[0]})")
    return [b - a for a, b in zip(values, values[1:])]


def _scale(scale: float | None, head_dim: int) -> float:
    return head_dim ** -0.5 if scale is None else float(scale)


def _output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    check_tensor("out", out, dtypes=(q.dtype,), shape=tuple(q.shape), device=q.device)
    return out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, *, scale: float | None = None, causal: bool = True,
                    out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of a packed variable-length batch; returns ``out`` (total_q, n_q_heads, head_dim).

    q: (total_q, n_q_heads, head_dim); k, v: (total_k, n_kv_heads, head_dim), same dtype; cu_seqlens_q/_k:
    int32 (batch + 1,) prefix sums. ``scale`` defaults to head_dim**-0.5. ``causal`` masks end-aligned
    (needs every k_len >= q_len).
    """
    check_tensor("k", k, dtypes=FLOAT_DTYPES, ndim=3)
    q_lens = _check_qkv_common(q, k.shape[1], cu_seqlens_q)
    check_tensor("k", k, dtypes=(q.dtype,), shape=(None, None, q.shape[2]), device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), shape=tuple(k.shape), device=q.device)
    k_lens = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k)
    if len(k_lens) != len(q_lens):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
                         f"{len(q_lens)} and {len(k_lens)} sequences")
    if causal and any(kl < ql for ql, kl in zip(q_lens, k_lens)):
        raise ValueError("causal attention needs every sequence to have at least as many keys as queries")
    out = _output(out, q)
    scale = _scale(scale, q.shape[2])
    where = resolve_backend(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, out)
    if where == "torch":
        return out.copy_(flash_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal))
    rows, tile_n = launch_config(where)
    if q.shape[0] == 0:
        return out
    grid = (cdiv(max(q_lens), rows), q.shape[1], len(q_lens))
    launch(flash_attention_kernel, grid, rows, q, k, v, out, cu_seqlens_q, cu_seqlens_k, numba.float32(scale),
           bool(causal), tile_n, backend=where)
    return out


def flash_attention_paged(q: torch.Tensor, kv_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float | None = None,
                          out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention of new query tokens over each sequence's context in the paged KV pool.

    q: (total_q, n_q_heads, head_dim); kv_cache: (num_blocks, 2, block_size, n_kv_heads, head_dim), same
    dtype, K at [:, 0] and V at [:, 1], with the new tokens' K/V already stored; block_tables: (batch,
    max_blocks) int32, padded (entries past a sequence's last block are not read); context_lens: (batch,)
    int32, each >= that sequence's q_len: its queries are the context's last q_len tokens.
    """
    check_tensor("kv_cache", kv_cache, dtypes=FLOAT_DTYPES, ndim=5)
    q_lens = _check_qkv_common(q, kv_cache.shape[3], cu_seqlens_q)
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[2]
    check_tensor("kv_cache", kv_cache, dtypes=(q.dtype,), shape=(None, 2, None, None, q.shape[2]), device=q.device)
    batch = len(q_lens)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), shape=(batch, None), device=q.device)
    check_tensor("context_lens", context_lens, dtypes=(torch.int32,), shape=(batch,), device=q.device)
    ctx = context_lens.tolist()
    if any(c < ql for ql, c in zip(q_lens, ctx)):
        raise ValueError(f"every context_len must be >= its q_len, got context_lens {ctx[:8]} "
                         f"and q_lens {q_lens[:8]}")
    if max(ctx, default=0) > block_tables.shape[1] * block_size:
        raise ValueError(f"block_tables has {block_tables.shape[1]} blocks of {block_size} per sequence, "
                         f"too few for a context of {max(ctx)} tokens")
    tables = block_tables.tolist()
    for b, c in enumerate(ctx):
        used = tables[b][:cdiv(c, block_size)]
        if any(not 0 <= blk < num_blocks for blk in used):
            raise ValueError(f"block_tables[{b}] points outside the pool of {num_blocks} blocks: {used}")
    out = _output(out, q)
    scale = _scale(scale, q.shape[2])
    where = resolve_backend(backend, q, kv_cache, cu_seqlens_q, block_tables, context_lens, out)
    if where == "torch":
        return out.copy_(flash_attention_paged_ref(q, kv_cache, cu_seqlens_q, block_tables, context_lens, scale))
    rows, tile_n = launch_config(where)
    if q.shape[0] == 0:
        return out
    grid = (cdiv(max(q_lens), rows), q.shape[1], batch)
    launch(flash_attention_paged_kernel, grid, rows, q, kv_cache, out, cu_seqlens_q, block_tables, context_lens,
           numba.float32(scale), tile_n, backend=where)
    return out


def _main() -> None:
    from kernels._timing import bench

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    lens, heads, kv_heads, head_dim, block = ([512, 1024, 2048], 16, 8, 128, 16) if on_gpu else ([5, 12], 2, 1, 16, 4)
    print(f"backend: {resolve_backend('auto', torch.empty(0, device=device))}, lengths {lens}")
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    n_blocks = [cdiv(n, block) for n in lens]
    tables = torch.zeros(len(lens), max(n_blocks), dtype=torch.int32, device=device)
    perm = torch.randperm(sum(n_blocks), device=device).to(torch.int32)  # non-contiguous blocks
    for b, n in enumerate(n_blocks):
        tables[b, :n] = perm[sum(n_blocks[:b]):sum(n_blocks[:b + 1])]
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    for dtype in FLOAT_DTYPES:
        q = torch.randn(sum(lens), heads, head_dim, device=device, dtype=dtype)
        pool = torch.randn(sum(n_blocks), 2, block, kv_heads, head_dim, device=device, dtype=dtype)
        k, v, _ = gather_paged_kv(pool, tables, ctx)
        k, v = k.contiguous(), v.contiguous()
        runs = {"dense": (lambda: flash_attention(q, k, v, cu, cu), lambda: flash_attention_ref(q, k, v, cu, cu)),
                "paged": (lambda: flash_attention_paged(q, pool, cu, tables, ctx),
                          lambda: flash_attention_paged_ref(q, pool, cu, tables, ctx))}
        for name, (fn, ref) in runs.items():
            err = (fn().float() - ref().float()).abs().max().item()
            line = f"{str(dtype)[6:]:9s} {name}  max |err| {err:.1e}"
            if on_gpu:
                line += f"  {bench(fn).median_us:9.1f} us"
            print(line)


if __name__ == "__main__":
    _main()
