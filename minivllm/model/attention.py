"""Attention for phase 06: one sequence, a contiguous KV cache, PyTorch's ``scaled_dot_product_attention``.

The model hands every layer's q, k, v as flattened tokens, ``(tokens, heads, head_dim)``, with an
:class:`AttentionMetadata` that says where the keys and values of earlier tokens are. Here that is a
:class:`KVCache`: per layer, one contiguous ``(max_tokens, kv_heads, head_dim)`` tensor for K and one for
V, where the token at position ``p`` lives in row ``p``. This is the simplest cache that works, and it
serves one sequence at a time.

Left out, on purpose, for later phases: batches of several sequences (``cu_seqlens``), a paged cache
(block tables and slot mapping, phase 08), and our own flash/paged attention kernels (phases 07-08).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minivllm.model.config import ModelConfig

_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # enable_gqa=


@dataclass(slots=True)
class KVCache:
    """Keys and values of one sequence, for every layer: (num_layers, max_tokens, kv_heads, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, config: ModelConfig, max_tokens: int, *, device: torch.device | str,
                 dtype: torch.dtype) -> "KVCache":
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        shape = (config.num_hidden_layers, max_tokens, config.num_key_value_heads, config.head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    @property
    def max_tokens(self) -> int:
        return self.k.shape[1]


@dataclass(slots=True)
class AttentionMetadata:
    """What attention needs to know about a step besides q, k and v.

    ``context_len``: the sequence's length once this step's tokens are stored (cached + new); the new
    tokens are the last ``tokens`` of it, at positions ``context_len - tokens .. context_len - 1``.
    """

    kv_cache: KVCache
    context_len: int


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta) -> torch.Tensor:
    """Causal attention of q over this step's and the cached keys; returns (tokens, q_heads * head_dim).

    q: (tokens, q_heads, d); k, v: (tokens, kv_heads, d). ``meta=None``: no cache, the tokens are a
    whole sequence. With a cache, k and v are first stored in rows ``context_len - tokens ..`` of ``layer``.
    A :class:`~minivllm.model.paged_attention.PagedAttentionMetadata` (the engine's batches, phase 12)
    goes to the paged path.
    """
    if meta is not None and not isinstance(meta, AttentionMetadata):
        from minivllm.model.paged_attention import paged_attention

        return paged_attention(q, k, v, layer, meta)
    tokens = q.shape[0]
    if meta is not None:
        start, end = meta.context_len - tokens, meta.context_len
        if start < 0 or end > meta.kv_cache.max_tokens:
            raise ValueError(f"tokens {start}..{end - 1} do not fit a KV cache of {meta.kv_cache.max_tokens} rows")
        # NOTE: rows are positions: the caller passes one sequence's consecutive positions
        meta.kv_cache.k[layer, start:end] = k
        meta.kv_cache.v[layer, start:end] = v
        k, v = meta.kv_cache.k[layer, :end], meta.kv_cache.v[layer, :end]  # (context, kv_heads, d)
    context = k.shape[0]
    # (1, heads, tokens or context, d): with a batch dimension, CPU SDPA takes its fused kernel (3-D: 2x slower)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    mask, causal = None, tokens > 1
    if tokens > 1 and context > tokens:  # new tokens after cached ones: query i sees keys <= its position
        keys = torch.arange(context, device=q.device)
        mask = keys[None, :] <= keys[context - tokens:, None]  # (tokens, context)
        causal = False
    if _SDPA_GQA:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    else:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out[0].transpose(0, 1).reshape(tokens, -1)  # (tokens, q_heads * d)
