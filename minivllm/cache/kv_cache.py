"""The paged KV cache: one pre-allocated pool of fixed-size token blocks per layer.

Every layer gets one tensor

    kv[layer]: (num_blocks, 2, block_size, num_kv_heads, head_dim)      # 2 = (K, V)

Block ``b`` holds K and V of ``block_size`` consecutive tokens of *some* sequence; which sequence, and
which of its tokens, is the block table's business (``minivllm.cache.block_table``). Token slot
``s = b * block_size + offset`` is the unit the KV-store kernel writes to.

Why this layout (vLLM's FlashAttention layout, with K and V of one block side by side):

* a block's K (and its V) is one contiguous ``block_size * num_kv_heads * head_dim`` run, so the decode
  kernel reads a whole page with long coalesced loads, and one pointer per layer addresses everything;
* one tensor per layer (not one for the whole model) keeps each layer's pool contiguous and lets the
  model hand a layer exactly its own pool.

With tensor parallelism (``minivllm.distributed``) every rank allocates its own pool over its own KV heads
(``KVShape.num_kv_heads`` of its shard), with the same number of blocks: one block table serves all ranks.

How many blocks: on a GPU, whatever is left of ``gpu_memory_utilization * total`` once the weights are
loaded and a profiling forward pass has reached its peak activation memory (:func:`gpu_kv_budget`);
on a CPU, a budget in bytes. Either way :func:`blocks_for_budget` turns bytes into blocks.

Left out: which blocks are free (``BlockAllocator``), per-sequence tables and slot mapping
(``block_table``), writing K/V (``kernels.store_kv``) and reading them (``kernels.paged_attention``).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

BLOCK_SIZE = 16  # tokens per block: vLLM's default


class KVShape(NamedTuple):
    """All the cache needs to know of a model (``ModelConfig.kv_shape`` gives it)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def bytes_per_block(shape: KVShape, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
    """Bytes one block costs across all layers: layers x 2 (K, V) x block_size x kv_heads x head_dim x itemsize."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return shape.num_layers * 2 * block_size * shape.num_kv_heads * shape.head_dim * itemsize


def blocks_for_budget(shape: KVShape, budget_bytes: int, dtype: torch.dtype,
                      block_size: int = BLOCK_SIZE) -> int:
    """How many whole blocks (each in every layer) fit in ``budget_bytes``; raises if not even one does."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be non-negative, got {budget_bytes}")
    per_block = bytes_per_block(shape, dtype, block_size)
    num_blocks = int(budget_bytes) // per_block
    if num_blocks == 0:
        raise ValueError(f"a KV budget of {budget_bytes:,} bytes holds no block ({per_block:,} bytes each: "
                         f"{shape.num_layers} layers x {block_size} tokens); raise gpu_memory_utilization "
                         f"or the memory budget, or use a smaller model")
    return num_blocks


class MemoryBaseline(NamedTuple):
    """What the GPU had free, and what this process's torch had reserved and allocated (another engine of the same
    process: a notebook's earlier one), when an engine began (:func:`gpu_memory_baseline`)."""

    free: int
    reserved: int = 0
    allocated: int = 0


def gpu_memory_baseline(device: torch.device | str) -> MemoryBaseline:
    """The GPU's free bytes and this process's torch reserve now: taken before an engine loads its weights, so that
    :func:`gpu_kv_budget` can tell what this engine took from what other processes hold. (Asking creates the CUDA
    context first, so the context is not counted as the engine's.)"""
    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    return MemoryBaseline(free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))


def gpu_kv_budget(device: torch.device | str, gpu_memory_utilization: float = 0.9,
                  profile: Callable[[], object] | None = None, baseline: MemoryBaseline | None = None) -> int:
    """Bytes left for the KV cache on ``device``, after the weights (already loaded) and ``profile``'s peak.

    ``profile`` runs a forward pass of the largest batch the engine will schedule; its peak memory
    (weights + activations, as torch's allocator saw it) is what the KV cache must leave room for.
    With ``baseline`` (:func:`gpu_memory_baseline`, taken when the engine began) ``gpu_memory_utilization`` is this
    engine's own share of the GPU, as in vLLM: memory held by other processes, or by this process before the engine
    began, does not count against it, but the cache never takes more than the GPU has free (:func:`kv_budget`).
    Without it, memory used by other processes counts against the share.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"gpu_kv_budget measures a CUDA device, got {device}; on a CPU pass a budget in bytes")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    if profile is not None:
        with torch.inference_mode():
            profile()
        torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    ours_now = torch.cuda.memory_reserved(device)
    peak = torch.cuda.max_memory_allocated(device)
    allocated = torch.cuda.memory_allocated(device)
    torch.cuda.empty_cache()
    return kv_budget(total, free, ours_now, peak, gpu_memory_utilization, baseline, allocated)


GIB = 2**30
KV_HEADROOM = GIB  # bytes (at most 5% of the GPU) a cache limited by the GPU's free memory leaves free beside it:
#                    the CUDA graphs captured after it and the libraries' workspaces need some


def kv_budget(total: int, free: int, ours: int, peak: int, gpu_memory_utilization: float,
              baseline: MemoryBaseline | None = None, allocated: int | None = None) -> int:
    """:func:`gpu_kv_budget`'s arithmetic, bytes: ``total`` and ``free`` the GPU's, ``ours`` this process's torch
    reserve, ``peak`` its peak allocation (weights + the profiled step), ``allocated`` what it holds now (default
    ``peak``).

    Without ``baseline``: ``gpu_memory_utilization`` of ``total``, less what the rest of the GPU holds
    (``total - free - ours``: other processes and the CUDA context) and ``peak``. With it: the share less this engine's
    own peak (``peak`` less what the process held at the baseline) and what the process took outside torch since then
    (compiled kernels, library handles), and at most what is free now (with torch's unused reserve) less
    ``KV_HEADROOM``, so a second engine on a GPU already in use starts with the cache that fits instead of failing.
    Raises, naming the memory held elsewhere, when nothing is left."""
    held_elsewhere = total - free - ours  # other processes (and the CUDA context)
    if baseline is None:
        budget = int(total * gpu_memory_utilization) - held_elsewhere - peak
    else:
        outside = max(0, (baseline.free - free) - (ours - baseline.reserved))
        own_peak = max(0, peak - baseline.allocated)
        fits = free + ours - (peak if allocated is None else allocated) - min(KV_HEADROOM, total // 20)
        budget = min(int(total * gpu_memory_utilization) - own_peak - outside, fits)
    if budget <= 0:
        raise RuntimeError(
            f"no GPU memory is left for the KV cache: gpu_memory_utilization={gpu_memory_utilization:g} allows "
            f"{total * gpu_memory_utilization / GIB:.1f} of the GPU's {total / GIB:.1f} GiB; this engine's weights "
            f"and largest step take {peak / GIB:.1f} GiB and the rest of the GPU holds {held_elsewhere / GIB:.1f} GiB "
            f"(other processes: another engine, a notebook kernel that still holds one, a server). Free that memory "
            f"(shut the other engine down or restart its kernel), or size the cache yourself with num_kv_blocks=")
    return budget


class PagedKVCache:
    """The pool: ``kv[layer]`` is a ``(num_blocks, 2, block_size, num_kv_heads, head_dim)`` tensor."""

    __slots__ = ("kv", "block_size", "num_blocks", "num_kv_heads", "head_dim")

    def __init__(self, kv: list[torch.Tensor]) -> None:
        if not kv:
            raise ValueError("a PagedKVCache needs at least one layer")
        shape = kv[0].shape
        if len(shape) != 5 or shape[1] != 2:
            raise ValueError(f"each layer must be (num_blocks, 2, block_size, kv_heads, head_dim), got {tuple(shape)}")
        if any(t.shape != shape or t.dtype != kv[0].dtype or t.device != kv[0].device for t in kv):
            raise ValueError("every layer's pool must have the same shape, dtype and device")
        self.kv = kv
        self.num_blocks, _, self.block_size, self.num_kv_heads, self.head_dim = shape

    @classmethod
    def allocate(cls, shape: KVShape, num_blocks: int, *, block_size: int = BLOCK_SIZE,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "PagedKVCache":
        """Zero-filled pools of ``num_blocks`` blocks for every one of ``shape.num_layers`` layers."""
        if not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        size = (num_blocks, 2, block_size, shape.num_kv_heads, shape.head_dim)
        return cls([torch.zeros(size, device=device, dtype=dtype) for _ in range(shape.num_layers)])

    @classmethod
    def from_budget(cls, shape: KVShape, budget_bytes: int, *, block_size: int = BLOCK_SIZE,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "PagedKVCache":
        """As many blocks as ``budget_bytes`` holds (see :func:`blocks_for_budget` and :func:`gpu_kv_budget`)."""
        num_blocks = blocks_for_budget(shape, budget_bytes, dtype, block_size)
        return cls.allocate(shape, num_blocks, block_size=block_size, device=device, dtype=dtype)

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={len(self.kv)}, num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.kv[0].dtype

    @property
    def device(self) -> torch.device:
        return self.kv[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def key(self, layer: int) -> torch.Tensor:
        """K of ``layer`` as a (num_blocks, block_size, kv_heads, head_dim) view (not contiguous)."""
        return self.kv[layer][:, 0]

    def value(self, layer: int) -> torch.Tensor:
        """V of ``layer`` as a (num_blocks, block_size, kv_heads, head_dim) view (not contiguous)."""
        return self.kv[layer][:, 1]
