"""Matrix-vector products for decode batches: ``y = x @ W.T`` for 1 to 8 tokens, bf16, W read once at 16 bytes.

At batch 1 a decoder layer's four matmuls are matrix-*vector* products: ``qkv_proj``, ``o_proj``,
``gate_up_proj`` and ``down_proj`` read 4 to 13 MB of weights each (Qwen3-0.6B, bf16) to do 2 multiply-adds
per weight. Their time is the time to read W, so the floor is bytes / HBM bandwidth: ~2-3 µs each on an H200.
Measured there, cuBLAS's kernels for these shapes took 5-12 µs each, ~0.8 ms of a 1.8 ms decode step in all
(its LM head, 311 MB, runs at the floor: it is big enough to fill the GPU). This kernel is the bandwidth-bound
design, with nothing else to do:

* a warp computes whole output rows: its lanes read row ``n`` of W as 16-byte chunks, lane ``l`` chunks
  ``l, l + 32, ...`` (``CPL`` = chunks per lane, a compile-time constant per width, so they stay in
  registers) -- every load instruction of the warp reads 512 contiguous bytes;
* all of a row's loads are issued before any is used (``CPL`` x 16 bytes in flight per lane), then each
  chunk's 8 weights meet the same 8 columns of every token's x (loaded 16 bytes at a time; x is small and is
  read from cache);
* five ``shfl_xor`` steps sum each token's dot product over the warp, and lane ``t`` writes token ``t``'s
  result, rounded to bf16 once (fp32 accumulation, as cuBLAS does).

Limits: bf16, ``K % 8 == 0``, K <= 8,192 (``CPL`` <= 32), 1 to ``MAX_TOKENS`` rows of x, contiguous tensors
16-byte aligned. The model's linear layers (``minivllm.model.layers.linear``) send a GPU step of up to
``ENGINE_MAX_TOKENS`` tokens here (0: none, cuBLAS for all; ``python -m kernels.gemv`` times both at Qwen3-0.6B's
shapes; ``python -m bench.latency`` runs an engine with cuBLAS beside the default). Checked against ``F.linear`` in numba's CUDA simulator (``tests/test_17_gemv.py``) and
compiled for every supported GPU (``kernels._ptx``).
"""

import functools

import numba
import torch
from numba import cuda

from kernels._checks import check_tensor
from kernels._launch import cdiv, launch, resolve_backend
from kernels._vec16 import aligned16, bf16_hi, bf16_lo, load_words

MAX_TOKENS = 8  # rows of x per call: each lane keeps one fp32 sum per token
MAX_CPL = 32  # chunks per lane: K up to 32 x 32 x 8 = 8,192 bf16
WARPS = 4  # warps per block
ENGINE_MAX_TOKENS = 8  # the model's linear layers use this kernel for steps of up to this many tokens (0: never).
#   Measured in the engine, batch-1 decode: on the H200 1.50 ms/token against 1.77 with cuBLAS (every one of 5
#   runs; bench/results/12_latency_cuda.json); on an H100 1.66 against 2.04 (h100/12_latency_cuda.json; 1.754 against
#   1.756 in an earlier run).
#   Alone on the H100: 1.1-1.3x cuBLAS at 1 token on Qwen3-0.6B's four projections (h100/17_gemv_cuda.json)
FULL_MASK = 0xFFFFFFFF


def gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in fp32, rounded to x's dtype: (tokens, K), (N, K) -> (tokens, N)."""
    return torch.nn.functional.linear(x.float(), weight.float()).to(x.dtype)


@functools.cache
def _kernel(cpl: int, tokens: int):
    """The kernel for ``cpl`` 16-byte chunks per lane and ``tokens`` rows of x (both unroll into registers)."""
    words = 4 * cpl  # a constant for numba: the local array's size

    def kernel(x, weight, out):
        # x: (tokens, K // 8) complex128; weight: (N, K // 8) complex128; out: (tokens, N) bf16
        wr = cuda.local.array(words, numba.int32)  # this lane's chunks of the row, as bf16 pairs
        acc = cuda.local.array(tokens, numba.float32)
        lane = cuda.threadIdx.x % 32
        chunks = weight.shape[1]
        n = cuda.blockIdx.x * (cuda.blockDim.x // 32) + cuda.threadIdx.x // 32
        while n < weight.shape[0]:  # grid-stride over output rows: a whole warp per row, so it exits as one
            for i in range(cpl):  # every load of the row first: cpl x 16 bytes in flight per lane
                c = lane + 32 * i
                if c < chunks:
                    wr[4 * i], wr[4 * i + 1], wr[4 * i + 2], wr[4 * i + 3] = load_words(weight[n], c)
                else:
                    wr[4 * i] = wr[4 * i + 1] = wr[4 * i + 2] = wr[4 * i + 3] = 0
            for t in range(tokens):
                acc[t] = numba.float32(0.0)
            for i in range(cpl):
                c = lane + 32 * i
                if c < chunks:
                    for t in range(tokens):
                        x0, x1, x2, x3 = load_words(x[t], c)
                        s = acc[t]
                        s += bf16_lo(wr[4 * i]) * bf16_lo(x0) + bf16_hi(wr[4 * i]) * bf16_hi(x0)
                        s += bf16_lo(wr[4 * i + 1]) * bf16_lo(x1) + bf16_hi(wr[4 * i + 1]) * bf16_hi(x1)
                        s += bf16_lo(wr[4 * i + 2]) * bf16_lo(x2) + bf16_hi(wr[4 * i + 2]) * bf16_hi(x2)
                        s += bf16_lo(wr[4 * i + 3]) * bf16_lo(x3) + bf16_hi(wr[4 * i + 3]) * bf16_hi(x3)
                        acc[t] = s
            for t in range(tokens):
                s = acc[t]
                for offset in (16, 8, 4, 2, 1):  # the sum over the warp, left in every lane
                    s += cuda.shfl_xor_sync(FULL_MASK, s, offset)
                if lane == t:
                    out[t, n] = s
            n += cuda.gridDim.x * (cuda.blockDim.x // 32)

    kernel.__name__ = kernel.__qualname__ = f"gemv_bf16_c{cpl}_t{tokens}"
    return cuda.jit(fastmath=True)(kernel)


_SIG = "void(complex128[:, ::1], complex128[:, ::1], bfloat16[:, ::1])"
# the shapes the course's model launches at batch 1: Qwen3-0.6B's K of 1,024 (4 chunks per lane), 2,048 (8) and
# 3,072 (12); the SmolLM2 widths 576 and 1,536 round up to 3 and 6
SIGNATURES = {_kernel(cpl, 1): [_SIG] for cpl in (3, 4, 6, 8, 12)}


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`gemv` takes these operands."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.dim() == 2 and weight.dim() == 2
            and 1 <= x.shape[0] <= MAX_TOKENS and x.shape[1] == weight.shape[1] and x.shape[1] % 8 == 0
            and cdiv(x.shape[1] // 8, 32) <= MAX_CPL and x.is_contiguous() and weight.is_contiguous()
            and aligned16(x, weight))


def gemv(x: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None,
         backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T``: x (tokens, K), weight (N, K) -> (tokens, N), bf16, 1 to ``MAX_TOKENS`` tokens."""
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2)
    check_tensor("weight", weight, dtypes=(torch.bfloat16,), ndim=2, device=x.device)
    if not supported(x, weight):
        raise ValueError(f"gemv takes 1..{MAX_TOKENS} tokens of a width K % 8 == 0, K <= {MAX_CPL * 256}, "
                         f"x's K equal to weight's, 16-byte aligned; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    tokens, n = x.shape[0], weight.shape[0]
    shape = (tokens, n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, dtypes=(x.dtype,), shape=shape, device=x.device)
    where = resolve_backend(backend, x, weight, out)
    if where == "torch":
        return out.copy_(gemv_ref(x, weight))
    kernel = _kernel(cdiv(x.shape[1] // 8, 32), tokens)
    warps = WARPS if where == "gpu" else 1  # the simulator: ~0.2 ms per thread, keep blocks small
    blocks = cdiv(n, warps) if where == "gpu" else min(cdiv(n, warps), 2)
    launch(kernel, blocks, 32 * warps, x.view(torch.complex128), weight.view(torch.complex128), out,
           backend=where)
    return out


def _main() -> None:
    from kernels._timing import graph_time

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    # Qwen3-0.6B's four layer matmuls (N, K); a CPU checks one small shape in the simulator
    shapes = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)] if on_gpu else [(6, 512)]
    for n, k in shapes:
        weight = torch.randn(n, k, device=device).to(torch.bfloat16) * 0.05
        for tokens in ((1, 2, 4, 8) if on_gpu else (1, 2)):
            x = torch.randn(tokens, k, device=device).to(torch.bfloat16)
            got = gemv(x, weight)
            err = (got.float() - gemv_ref(x, weight).float()).abs().max().item()
            line = f"N {n:5d} K {k:5d} tokens {tokens} max |err| {err:.1e}"
            if on_gpu:
                floor_us = weight.nbytes / 4.3e6
                ours = graph_time(lambda: gemv(x, weight, out=got)).median_us
                cublas = graph_time(lambda: torch.nn.functional.linear(x, weight)).median_us
                line += (f" | ours {ours:6.2f} us ({floor_us / ours:4.0%} of the HBM floor) | cuBLAS {cublas:6.2f} us"
                         f" ({floor_us / cublas:4.0%}) | ours / cuBLAS {cublas / ours:4.2f}x faster")
            print(line, flush=True)


if __name__ == "__main__":
    _main()
