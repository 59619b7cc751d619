"""Store the new tokens' K and V into their slots of a layer's paged KV cache.

    key, value: (tokens, kv_heads, head_dim)       this step's K and V, after RoPE
    kv_cache:   (num_blocks, 2, block_size, kv_heads, head_dim)   one layer's pool (minivllm.cache.kv_cache)
    slot_mapping: (tokens,) int64                   slot = block * block_size + offset; -1 = skip

Token ``t`` goes to ``kv_cache[slot // block_size, 0 or 1, slot % block_size]``. A slot of -1 (a padding
token of a CUDA-graph batch) is skipped. One thread per (token, head, element), grid-stride; neighbouring
threads write neighbouring elements, so each token's row is one coalesced store.

An fp8 cache (``torch.float8_e4m3fn``) takes any float key and value, each rounded to e4m3 (``kernels._fp8``).

Limits: otherwise the dtypes of key, value and the cache must agree; slots are not checked on the
GPU (the launcher checks them on CPU tensors), so an out-of-range slot there is a memory error.
``python -m kernels.store_kv`` checks (and on a GPU times) it.
"""

import torch
from numba import cuda

from kernels._checks import FLOAT_DTYPES, FP8, check_same, check_tensor
from kernels._fp8 import e4m3_byte, to_e4m3_bytes
from kernels._launch import cdiv, launch, resolve_backend


# ----------------------------------------------------------------------------- reference
def store_kv_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """In place, with torch indexing: ``kv_cache`` viewed as (2, slots, kv_heads, head_dim) rows."""
    num_blocks, _, block_size, heads, dim = kv_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key, value = key[keep], value[keep]
    if kv_cache.dtype == FP8:  # PyTorch's rounding, saturated as the kernels'
        key, value, kv_cache = to_e4m3_bytes(key), to_e4m3_bytes(value), kv_cache.view(torch.uint8)
    kv_cache[blocks, 0, offsets] = key
    kv_cache[blocks, 1, offsets] = value


# ----------------------------------------------------------------------------- kernel
def _build(fp8: bool):
    """The kernel for a cache of the key's dtype or, ``fp8``, of e4m3 bytes (``kernels._fp8``) viewed as uint8."""

    def store_kv_kernel(key, value, kv_cache, slot_mapping):
        # key, value: (tokens, heads, dim); kv_cache: (blocks, 2, block_size, heads, dim)
        tokens, heads, dim = key.shape
        block_size = kv_cache.shape[2]
        per_token = heads * dim
        i = cuda.grid(1)
        while i < tokens * per_token:
            t = i // per_token
            h = (i // dim) % heads
            d = i % dim
            slot = slot_mapping[t]
            if slot >= 0:
                b = slot // block_size
                o = slot % block_size
                if fp8:
                    kv_cache[b, 0, o, h, d] = e4m3_byte(key[t, h, d])
                    kv_cache[b, 1, o, h, d] = e4m3_byte(value[t, h, d])
                else:
                    kv_cache[b, 0, o, h, d] = key[t, h, d]
                    kv_cache[b, 1, o, h, d] = value[t, h, d]
            i += cuda.gridsize(1)

    if fp8:
        store_kv_kernel.__name__ = store_kv_kernel.__qualname__ = "store_kv_fp8_kernel"
    return cuda.jit(store_kv_kernel)


store_kv_kernel, store_kv_fp8_kernel = _build(False), _build(True)


_TYPES = ("float32", "float16", "bfloat16")
SIGNATURES = {
    store_kv_kernel: [f"void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, :, :, ::1], int64[::1])" for t in _TYPES],
    store_kv_fp8_kernel: [f"void({t}[:, :, ::1], {t}[:, :, ::1], uint8[:, :, :, :, ::1], int64[::1])" for t in _TYPES],
}


# ----------------------------------------------------------------------------- launcher
def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
             threads: int = 256, backend: str = "auto") -> torch.Tensor:
    """IN PLACE: write ``key``/``value`` (tokens, kv_heads, head_dim) into ``kv_cache`` at ``slot_mapping``."""
    check_tensor("key", key, dtypes=FLOAT_DTYPES, ndim=3)
    check_tensor("value", value)
    check_same("key", key, "value", value)
    tokens, heads, dim = key.shape
    check_tensor("kv_cache", kv_cache, dtypes=(key.dtype, FP8), shape=(None, 2, None, heads, dim), device=key.device)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(tokens,), device=key.device)
    num_slots = kv_cache.shape[0] * kv_cache.shape[2]
    if slot_mapping.device.type == "cpu" and tokens and (slot_mapping.min() < -1 or slot_mapping.max() >= num_slots):
        raise ValueError(f"slot_mapping must hold -1 (skip) or slots in 0..{num_slots - 1}")
    where = resolve_backend(backend, key, value, kv_cache, slot_mapping)
    if where == "torch":
        store_kv_ref(key, value, kv_cache, slot_mapping)
        return kv_cache
    if tokens == 0:
        return kv_cache
    threads = 64 if where == "simulator" else threads
    blocks = cdiv(key.numel(), threads)
    blocks = min(blocks, 4) if where == "simulator" else blocks
    fp8 = kv_cache.dtype == FP8
    launch(store_kv_fp8_kernel if fp8 else store_kv_kernel, blocks, threads, key, value,
           kv_cache.view(torch.uint8) if fp8 else kv_cache, slot_mapping, backend=where)
    return kv_cache


def _main() -> None:
    from kernels._timing import graph_time

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    tokens, heads, dim, blocks = (4096, 8, 128, 4096) if on_gpu else (6, 2, 16, 4)
    print(f"backend: {resolve_backend('auto', torch.empty(0, device=device))}")
    for dtype in FLOAT_DTYPES:
        key, value = (torch.randn(tokens, heads, dim, device=device).to(dtype) for _ in range(2))
        cache = torch.zeros(blocks, 2, 16, heads, dim, device=device, dtype=dtype)
        slots = torch.randperm(blocks * 16, device=device)[:tokens]
        want = cache.clone()
        store_kv_ref(key, value, want, slots)
        ok = torch.equal(store_kv(key, value, cache, slots), want)
        line = f"{str(dtype)[6:]:9s} {tokens} tokens  {'ok' if ok else 'FAIL'}"
        if on_gpu:
            us = graph_time(lambda: store_kv(key, value, cache, slots)).median_us
            line += f"  {us:7.1f} us  {4 * key.nbytes / us / 1e3:6.0f} GB/s"
        print(line)


if __name__ == "__main__":
    _main()
