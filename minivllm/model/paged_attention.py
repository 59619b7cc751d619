"""Attention over the paged KV cache, for a batch that mixes decodes and prefill chunks (phase 12).

The engine's step is one flat batch of tokens. The scheduler orders it **decodes first**: rows
``0 .. num_decodes - 1`` are one token each of a generating sequence, the rest are prefill chunks (a
prompt, a piece of a long prompt, or the tail of a prompt whose head came from the prefix cache).
Each layer then

1. stores this step's K and V in their slots (``kernels.store_kv``; slot -1 = a padding row, skipped);
2. decodes: one query per sequence over its whole context, read through its block table
   (``kernels.paged_attention_warp`` on a GPU: one launch, no host sync, capturable in a CUDA graph;
   on a CPU in fp32 the numba kernel ``kernels.paged_attention_cpu``, which reads the pages in place;
   otherwise, or with ``backend="torch"``, a batched gather + SDPA);
3. prefills: each chunk's queries over its context, causal and aligned to the end. On a GPU in bf16/fp16,
   **one** variable-length FlashAttention call per layer for every prefill sequence of the step
   (``cu_seqlens``; tensor cores), the keys read back from the cache in one gather only when part of some
   context was computed in an earlier step; ``attention_backend="numba"`` takes our tensor-core kernel
   (``kernels.flash_attention_mma``, sm_80+, head_dim 64/128) on the same inputs, or else our scalar
   ``kernels.flash_attention_paged``. Elsewhere (a CPU, fp32) one ``scaled_dot_product_attention`` per
   sequence.

:class:`PagedAttentionMetadata` carries the batch's layout, built once per step by the runner and
passed down explicitly. Host-side copies of the lengths avoid a device sync per layer. On a GPU, a learner's
passed kernels (``minivllm.learner``) replace the package's: ``store_kv`` and ``paged_attention`` (phase 08) in
steps 1 and 2; ``flash_attention`` (phase 07) in step 3, called once per layer on every prefill sequence's
queries and whole context, packed (``cu_seqlens_q``, ``cu_seqlens_k``).

An **fp8 cache** (``kv_cache_dtype="fp8"``: e4m3 bytes, ``kernels._fp8``) changes three things: the store rounds K
and V to e4m3; decode reads the bytes in place (the same warp kernel, 16 values per 16-byte load); a prefill step whose
contexts are all new attends over K and V as computed, and one that reads contexts back from the cache widens them
to the model's dtype first.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from minivllm.cache.kv_cache import PagedKVCache
from minivllm.model.layers import LEARNER_KERNELS, launcher
from minivllm.utils import cdiv

if TYPE_CHECKING:
    from minivllm.piecewise import AttentionSplit

_FLASH = hasattr(torch.ops.aten, "_flash_attention_forward")  # FlashAttention-2 in CUDA builds of torch
FP8 = torch.float8_e4m3fn  # an fp8 KV cache (EngineConfig.kv_cache_dtype="fp8"): e4m3 bytes, kernels._fp8


def _read(kv: torch.Tensor, index: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``kv[index]`` in ``dtype``: from an fp8 pool, its bytes are gathered (as uint8) and then widened."""
    if kv.dtype != FP8:
        return kv[index]
    return kv.view(torch.uint8)[index].view(FP8).to(dtype)


@dataclass(slots=True)
class PagedAttentionMetadata:
    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor  # (tokens,) int64, -1 = do not store (padding)
    block_tables: torch.Tensor  # (seqs, width) int32, -1 padded
    context_lens: torch.Tensor  # (seqs,) int32: each sequence's length after this step
    num_decodes: int  # the first num_decodes rows (and sequences) are single-token decodes
    max_context_len: int  # >= every context length (a CUDA graph fixes it once)
    query_lens: list[int]  # (seqs - num_decodes,) host copies, prefill sequences only
    prefill_context_lens: list[int]  # (seqs - num_decodes,)
    backend: str = "auto"  # "auto" | "numba" | "torch"
    varlen: "VarlenLayout | None" = None  # built by the first layer's prefill, reused by the others
    # NOTE: set only by the runner's piecewise CUDA graphs (minivllm.piecewise): the forward pass is cut at
    # every attention call, which hands q, k, v to split.attend instead of attending
    split: "AttentionSplit | None" = None


@dataclass(slots=True)
class VarlenLayout:
    """The step's prefill sequences packed for one variable-length attention call (the same in every layer)."""

    cu_q: torch.Tensor  # (prefills + 1,) int32: query rows of sequence i are cu_q[i] .. cu_q[i + 1] - 1
    cu_k: torch.Tensor  # (prefills + 1,) int32: the same for its keys (its whole context)
    max_q: int
    max_k: int
    blocks: torch.Tensor | None  # (total keys,) int64: the cache block of each context key; None: all keys are new
    offsets: torch.Tensor | None  # (total keys,) int64: its row in that block


def _varlen_layout(meta: PagedAttentionMetadata, block_size: int, device: torch.device) -> VarlenLayout:
    if meta.varlen is None:
        q_lens, ctx = np.asarray(meta.query_lens), np.asarray(meta.prefill_context_lens)
        cu_q, cu_k = np.zeros(len(q_lens) + 1, np.int32), np.zeros(len(ctx) + 1, np.int32)
        np.cumsum(q_lens, out=cu_q[1:])
        np.cumsum(ctx, out=cu_k[1:])
        blocks = offsets = None
        if (ctx != q_lens).any():  # some keys were computed earlier: every context key is read from the cache
            seq = np.repeat(np.arange(len(ctx)) + meta.num_decodes, ctx)  # (keys,) the row of its block table
            pos = np.arange(cu_k[-1]) - np.repeat(cu_k[:-1], ctx)  # its position in its sequence
            where = torch.from_numpy(np.stack([seq, pos])).to(device, non_blocking=True)
            blocks = meta.block_tables[where[0], where[1] // block_size].long()
            offsets = where[1] % block_size
        meta.varlen = VarlenLayout(torch.from_numpy(cu_q).to(device, non_blocking=True),
                                   torch.from_numpy(cu_k).to(device, non_blocking=True),
                                   int(q_lens.max()), int(ctx.max()), blocks, offsets)
    return meta.varlen


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                  meta: PagedAttentionMetadata, ours: bool = False) -> torch.Tensor:
    """Every prefill sequence in one FlashAttention call: q (tokens, q_heads, d) -> (tokens, q_heads, d).
    ``ours``: our tensor-core kernel (``kernels.flash_attention_mma``) rather than PyTorch's FlashAttention-2."""
    kv = meta.kv_cache.kv[layer]  # (blocks, 2, block_size, kv_heads, d)
    lay = _varlen_layout(meta, kv.shape[2], q.device)
    if lay.blocks is not None:  # the whole contexts, cached keys included, in the packed order of cu_k
        k, v = (_read(kv, (lay.blocks, i, lay.offsets), q.dtype) for i in (0, 1))
    if ours:
        return launcher("flash_attention_mma", "flash_attention_mma")(q, k, v, lay.cu_q, lay.cu_k,
                                                                      max_seqlen_q=lay.max_q)
    # causal with fewer queries than keys aligns the queries to the end: query i sees keys <= its position
    return torch.ops.aten._flash_attention_forward(q, k, v, lay.cu_q, lay.cu_k, lay.max_q, lay.max_k, 0.0, True,
                                                   False)[0]


def _flash_ok(q: torch.Tensor, meta: PagedAttentionMetadata) -> bool:
    return q.is_cuda and meta.backend == "auto" and q.dtype in (torch.bfloat16, torch.float16) and _FLASH


def _gpu(meta: PagedAttentionMetadata, x: torch.Tensor) -> bool:
    return x.is_cuda and meta.backend != "torch"


def store(k: torch.Tensor, v: torch.Tensor, layer: int, meta: PagedAttentionMetadata) -> None:
    kv = meta.kv_cache.kv[layer]  # (blocks, 2, block_size, kv_heads, d)
    k, v = k.contiguous(), v.contiguous()
    if _gpu(meta, k):
        (LEARNER_KERNELS.get("store_kv") or launcher("store_kv", "store_kv"))(k, v, kv, meta.slot_mapping)
        return
    slots = meta.slot_mapping
    keep = slots >= 0
    if not bool(keep.all()):
        k, v, slots = k[keep], v[keep], slots[keep]
    if kv.dtype == FP8:  # rounded to e4m3 as the GPU kernels do (saturated at +-448), stored as bytes
        from kernels._fp8 import to_e4m3_bytes

        k, v, kv = to_e4m3_bytes(k), to_e4m3_bytes(v), kv.view(torch.uint8)
    flat = kv.view(kv.shape[0], 2, kv.shape[2], -1)  # (blocks, 2, block_size, kv_heads * d)
    blocks, offsets = slots // kv.shape[2], slots % kv.shape[2]
    flat[blocks, 0, offsets] = k.reshape(k.shape[0], -1)
    flat[blocks, 1, offsets] = v.reshape(v.shape[0], -1)


def decode(q: torch.Tensor, layer: int, meta: PagedAttentionMetadata) -> torch.Tensor:
    """q: (decodes, q_heads, d) -> (decodes, q_heads, d)."""
    n = meta.num_decodes
    kv = meta.kv_cache.kv[layer]
    tables, lens = meta.block_tables[:n], meta.context_lens[:n]
    if _gpu(meta, q):
        fn = LEARNER_KERNELS.get("paged_attention") or launcher("paged_attention_warp", "paged_attention_warp")
        return fn(q, kv, tables, lens, max_context_len=meta.max_context_len)
    if not q.is_cuda and q.dtype == kv.dtype == torch.float32 and meta.backend != "torch":  # reads pages in place
        return launcher("paged_attention_cpu", "paged_decode_cpu")(q, kv, tables, lens)
    width = cdiv(meta.max_context_len, kv.shape[2])
    tables = tables[:, :width].clamp(min=0).long()  # (n, width)
    pages = _read(kv, (tables,), q.dtype)  # (n, width, 2, block_size, kv_heads, d)
    k = pages[:, :, 0].flatten(1, 2).transpose(1, 2)  # (n, kv_heads, width * block_size, d)
    v = pages[:, :, 1].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]  # (n, keys)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                         enable_gqa=True)  # (n, q_heads, 1, d)
    return out[:, :, 0]


def _context_kv(i: int, row: int, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
                meta: PagedAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill sequence ``i``'s keys and values, (context_len, kv_heads, d) each; its queries start at ``row``."""
    q_len, ctx = meta.query_lens[i], meta.prefill_context_lens[i]
    if ctx == q_len:  # the whole context is new: this step's k and v are all of it
        return k[row: row + q_len], v[row: row + q_len]
    # earlier tokens are in the cache (a prefix hit or an earlier chunk): read them all back
    table = meta.block_tables[meta.num_decodes + i, : cdiv(ctx, kv.shape[2])].long()
    pages = _read(kv, (table,), k.dtype)  # (blocks, 2, block_size, kv_heads, d)
    return pages[:, 0].flatten(0, 1)[:ctx], pages[:, 1].flatten(0, 1)[:ctx]


def _cu_seqlens(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)  # (seqs + 1,)


def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
            meta: PagedAttentionMetadata) -> torch.Tensor:
    """The prefill rows: q (tokens, q_heads, d) with this step's k, v (tokens, kv_heads, d)."""
    kv = meta.kv_cache.kv[layer]
    if _gpu(meta, q) and "flash_attention" in LEARNER_KERNELS:  # the learner's kernel: one call, packed
        rows = [0, *torch.tensor(meta.query_lens).cumsum(0).tolist()]
        ks, vs = zip(*(_context_kv(i, rows[i], k, v, kv, meta) for i in range(len(meta.query_lens))))
        return LEARNER_KERNELS["flash_attention"](q.contiguous(), torch.cat(ks), torch.cat(vs),
                                                  _cu_seqlens(meta.query_lens, q.device),
                                                  _cu_seqlens(meta.prefill_context_lens, q.device))
    if _flash_ok(q, meta):
        return _flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), layer, meta)
    if q.is_cuda and meta.backend == "numba" and launcher("flash_attention_mma", "supported")(q):
        return _flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), layer, meta, ours=True)
    if q.is_cuda and meta.backend == "numba" and kv.dtype == q.dtype:
        n = meta.num_decodes
        cu = torch.tensor([0, *torch.tensor(meta.query_lens).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
        return launcher("flash_attention", "flash_attention_paged")(
            q, kv, cu, meta.block_tables[n:], meta.context_lens[n:])
    out = torch.empty_like(q)
    row = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.prefill_context_lens)):
        qi = q[row: row + q_len].transpose(0, 1).unsqueeze(0)  # (1, q_heads, q_len, d)
        ki, vi = _context_kv(i, row, k, v, kv, meta)  # (ctx, kv_heads, d) each
        mask = None
        if ctx != q_len:
            keys = torch.arange(ctx, device=q.device)
            mask = keys[None, :] <= keys[ctx - q_len:, None]  # (q_len, ctx): query i sees keys <= its position
        ki, vi = ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None and q_len > 1,
                                           enable_gqa=True)
        out[row: row + q_len] = o[0].transpose(0, 1)
        row += q_len
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                    meta: PagedAttentionMetadata, stored: bool = False) -> torch.Tensor:
    """q: (tokens, q_heads, d), k, v: (tokens, kv_heads, d) -> (tokens, q_heads * d). ``stored``: k and v are in
    the cache already (``kernels.qkv_prep`` stored them)."""
    if meta.split is not None:  # a piecewise CUDA graph ends here: attention runs between two pieces
        return meta.split.attend(q, k, v, layer, stored)
    if not stored:
        store(k, v, layer, meta)
    n = meta.num_decodes
    if n == q.shape[0]:
        return decode(q, layer, meta).reshape(q.shape[0], -1)
    out = torch.empty_like(q)
    if n:
        out[:n] = decode(q[:n], layer, meta)
    out[n:] = prefill(q[n:], k[n:], v[n:], layer, meta)
    return out.reshape(q.shape[0], -1)
