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
``ENGINE_MAX_TOKENS`` tokens here (0: none, cuBLAS for all; ``python -m bench.gemv`` times both at Qwen3-0.6B's
shapes, and the prologue kernels below against the launches they replace; ``python -m bench.latency`` runs an
engine with cuBLAS beside the default). Checked against ``F.linear`` in numba's CUDA simulator
(``tests/test_17_gemv.py``) and compiled for every supported GPU (``kernels._ptx``).
"""

import functools
import math

import numba
import torch
from numba import config, cuda

from kernels._checks import check_tensor
from kernels._launch import cdiv, launch, resolve_backend
from kernels._pdl import mark, pdl_trigger, pdl_wait
from kernels._vec16 import aligned16, bf16_hi, bf16_lo, load_words

MAX_TOKENS = 8  # rows of x per call: each lane keeps one fp32 sum per token
MAX_CPL = 32  # chunks per lane: K up to 32 x 32 x 8 = 8,192 bf16
WARPS = 4  # warps per block
ENGINE_MAX_TOKENS = 2  # the model's linear layers use this kernel for steps of up to this many tokens (0: never).
#   Alone on the H100 (CUDA-graph replay, Qwen3-0.6B's four matmuls, bench/results/h100/17_gemv_cuda.json): at 1 token
#   1.14-1.33x cuBLAS on each; at 2 tokens 1.02, 1.26, 0.87 and 1.18x (together ~1 us a layer less); at 4 tokens
#   cuBLAS is faster in all (~2 us a layer), at 8 on each. In the engine, batch-1 decode: H200 1.50 against 1.77
#   ms/token with cuBLAS (bench/results/12_latency_cuda.json), H100 1.70 against 1.89 (h100/12_latency_cuda.json)
ENGINE_SILU_PROLOGUE = True  # steps of up to PROLOGUE_MAX_TOKENS tokens fold SiLU·mul into down_proj (gemv_silu,
#   below; minivllm.model.layers.silu_and_mul_linear). Measured on the H100 at 1 token (CUDA-graph replay,
#   h100/17_gemv_cuda.json): 5.6-5.7 us against 6.6 for the two launches (three runs). gemv_add_norm, the same fold
#   for the add + RMSNorm, alone: 6.5 against 7.4 us before qkv_proj but 8.9 against 8.2 before gate_up_proj.
#   The add + norm fold was also wired into the model (both places) and timed in the engine on the H100 with PDL
#   (kernels._pdl): batch-1 decode 1.096 ms/token with it against 0.956 without (h100/12_latency_cuda_add_norm.json,
#   commit 8e5592c), likely because each of its 1,536 or 1,024 blocks redoes the norm and waits at two barriers
#   before its first multiply. So the model does not use it
PROLOGUE_MAX_TOKENS = 1  # at 2 tokens and more each prologue kernel was slower than its two launches
FULL_MASK = 0xFFFFFFFF


def gemv_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in fp32, rounded to x's dtype: (tokens, K), (N, K) -> (tokens, N)."""
    return torch.nn.functional.linear(x.float(), weight.float()).to(x.dtype)


@cuda.jit(device=True, inline=True)
def chunk_dot(s, wr, i, x0, x1, x2, x3):
    """``s`` plus chunk ``i`` of a row of W (words ``wr[4i:4i+4]``: 8 bf16) dotted with 8 bf16 of x in ``x0..x3``."""
    s += bf16_lo(wr[4 * i]) * bf16_lo(x0) + bf16_hi(wr[4 * i]) * bf16_hi(x0)
    s += bf16_lo(wr[4 * i + 1]) * bf16_lo(x1) + bf16_hi(wr[4 * i + 1]) * bf16_hi(x1)
    s += bf16_lo(wr[4 * i + 2]) * bf16_lo(x2) + bf16_hi(wr[4 * i + 2]) * bf16_hi(x2)
    s += bf16_lo(wr[4 * i + 3]) * bf16_lo(x3) + bf16_hi(wr[4 * i + 3]) * bf16_hi(x3)
    return s


@cuda.jit(device=True, inline=True)
def warp_sum(s):
    """The sum of ``s`` over the warp, in every lane (five ``shfl_xor`` steps)."""
    for offset in (16, 8, 4, 2, 1):
        s += cuda.shfl_xor_sync(FULL_MASK, s, offset)
    return s


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
        pdl_trigger()  # the next kernel may launch (kernels._pdl)
        while n < weight.shape[0]:  # grid-stride over output rows: a whole warp per row, so it exits as one
            for i in range(cpl):  # every load of the row first: cpl x 16 bytes in flight per lane
                c = lane + 32 * i
                if c < chunks:
                    wr[4 * i], wr[4 * i + 1], wr[4 * i + 2], wr[4 * i + 3] = load_words(weight[n], c)
                else:
                    wr[4 * i] = wr[4 * i + 1] = wr[4 * i + 2] = wr[4 * i + 3] = 0
            pdl_wait()  # the weights are in flight: now wait for the kernel that wrote x (at once after the first)
            for t in range(tokens):
                acc[t] = numba.float32(0.0)
            for i in range(cpl):
                c = lane + 32 * i
                if c < chunks:
                    for t in range(tokens):
                        x0, x1, x2, x3 = load_words(x[t], c)
                        acc[t] = chunk_dot(acc[t], wr, i, x0, x1, x2, x3)
            for t in range(tokens):  # the sum over the warp; lane t writes token t's
                total = warp_sum(acc[t])
                if lane == t:
                    out[t, n] = total
            n += cuda.gridDim.x * (cuda.blockDim.x // 32)
        pdl_wait()  # a warp without a row waits too: every PDL grid must, before it ends

    kernel.__name__ = kernel.__qualname__ = f"gemv_bf16_c{cpl}_t{tokens}"
    return mark(cuda.jit(fastmath=True)(kernel))


_SIG = "void(complex128[:, ::1], complex128[:, ::1], bfloat16[:, ::1])"
# the shapes the course's model launches at batch 1: Qwen3-0.6B's K of 1,024 (4 chunks per lane), 2,048 (8) and
# 3,072 (12); the SmolLM2 widths 576 and 1,536 round up to 3 and 6
SIGNATURES = {_kernel(cpl, 1): [_SIG] for cpl in (3, 4, 6, 8, 12)}
SIGNATURES.update({chunk_dot: ["float32(float32, int32[::1], int64, int32, int32, int32, int32)"],
                   warp_sum: ["float32(float32)"]})


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



# ----------------------------------------------------------------------------- a prologue folded in
# At batch 1 a decoder layer launches ~10 kernels; in a CUDA graph each still costs a few µs of ramp-up and tail
# however little it does. Two of them only prepare a gemv's input: the add + RMSNorm before ``qkv_proj`` and
# ``gate_up_proj``, and SiLU·mul before ``down_proj``. Their inputs are a few KB, so every block of the gemv can
# redo that work itself: it issues its weight loads first, then builds the prepared x in shared memory while
# those loads are in flight, and the separate kernel (and its launch) is gone. The values are rounded exactly
# where the separate kernels round them (the new residual, the normalized x, SiLU·mul: bf16 each).
MAX_SHARED = 48 * 1024  # bytes of prepared x per block (tokens x K bf16): numba's static shared-memory limit


def _xs_index(t, j, c, span):
    return (4 * t + j) * span + c  # word j of chunk c of token t: consecutive lanes, consecutive banks


@functools.cache
def _prologue_kernel(cpl: int, tokens: int, prologue: str):
    """The gemv with x prepared in shared memory: ``prologue`` is ``"silu"`` or ``"add_norm"``."""
    from kernels.activation import silu_mul_bf16x2
    from kernels._vec16 import pack_bf16, store_words

    words, span = 4 * cpl, 32 * cpl
    shared_words, partial_floats = 4 * span * tokens, 32 * tokens
    xs_at = cuda.jit(device=True, inline=True)(_xs_index)

    @cuda.jit(device=True, inline=True)
    def issue(weight, n, lane, wr):
        """Row ``n`` of W into this lane's registers: loads only, none used yet."""
        chunks = weight.shape[1]
        for i in range(cpl):
            c = lane + 32 * i
            if n < weight.shape[0] and c < chunks:
                wr[4 * i], wr[4 * i + 1], wr[4 * i + 2], wr[4 * i + 3] = load_words(weight[n], c)
            else:
                wr[4 * i] = wr[4 * i + 1] = wr[4 * i + 2] = wr[4 * i + 3] = 0

    @cuda.jit(device=True, inline=True)
    def rows(weight, out, xs, n, lane, wr, acc):
        """The gemv proper, x read from shared memory; ``n`` is this warp's first row (loads already issued)."""
        chunks = weight.shape[1]
        stride = cuda.gridDim.x * (cuda.blockDim.x // 32)
        while n < weight.shape[0]:  # warp-uniform
            for t in range(tokens):
                acc[t] = numba.float32(0.0)
            for i in range(cpl):
                c = lane + 32 * i
                if c < chunks:
                    for t in range(tokens):
                        x0, x1 = xs[xs_at(t, 0, c, span)], xs[xs_at(t, 1, c, span)]
                        x2, x3 = xs[xs_at(t, 2, c, span)], xs[xs_at(t, 3, c, span)]
                        acc[t] = chunk_dot(acc[t], wr, i, x0, x1, x2, x3)
            for t in range(tokens):  # the sum over the warp; lane t writes token t's
                total = warp_sum(acc[t])
                if lane == t:
                    out[t, n] = total
            n += stride
            issue(weight, n, lane, wr)


    def silu_kernel(gate_up, weight, out):
        # gate_up: (tokens, 2 K // 8) complex128, [gate | up]; weight: (N, K // 8) complex128; out: (tokens, N)
        xs = cuda.shared.array(shared_words, numba.int32)
        wr = cuda.local.array(words, numba.int32)
        acc = cuda.local.array(tokens, numba.float32)
        lane = cuda.threadIdx.x % 32
        chunks = weight.shape[1]
        n = cuda.blockIdx.x * (cuda.blockDim.x // 32) + cuda.threadIdx.x // 32
        pdl_trigger()
        issue(weight, n, lane, wr)
        pdl_wait()  # the first row's weights are in flight; x is the previous kernel's output
        for t in range(tokens):  # x = silu(gate) * up, rounded to bf16 as the SiLU·mul kernel does
            c = cuda.threadIdx.x
            while c < chunks:
                g0, g1, g2, g3 = load_words(gate_up[t], c)
                u0, u1, u2, u3 = load_words(gate_up[t], chunks + c)
                xs[xs_at(t, 0, c, span)] = silu_mul_bf16x2(g0, u0)
                xs[xs_at(t, 1, c, span)] = silu_mul_bf16x2(g1, u1)
                xs[xs_at(t, 2, c, span)] = silu_mul_bf16x2(g2, u2)
                xs[xs_at(t, 3, c, span)] = silu_mul_bf16x2(g3, u3)
                c += cuda.blockDim.x
        cuda.syncthreads()
        rows(weight, out, xs, n, lane, wr, acc)

    def add_norm_kernel(x, residual, norm_weight, eps, weight, out, new_residual):
        # x, residual, new_residual: (tokens, K // 8) complex128; norm_weight: (K // 8,) complex128
        # (a version where each warp prepared its own chunks in registers, no barrier, measured slower on the H100:
        # 8.8 and 12.2 us against this one's 6.6 and 8.8 at 1 token)
        xs = cuda.shared.array(shared_words, numba.int32)
        partials = cuda.shared.array(partial_floats, numba.float32)  # per warp, per token: sums of squares
        wr = cuda.local.array(words, numba.int32)
        acc = cuda.local.array(tokens, numba.float32)
        lane, warp, warps = cuda.threadIdx.x % 32, cuda.threadIdx.x // 32, cuda.blockDim.x // 32
        chunks = weight.shape[1]
        n = cuda.blockIdx.x * warps + warp
        pdl_trigger()
        issue(weight, n, lane, wr)
        pdl_wait()  # the first row's weights are in flight; x is the previous kernel's output
        for t in range(tokens):  # the new residual x + residual, rounded to bf16; block 0 writes it out
            c = cuda.threadIdx.x
            sq = numba.float32(0.0)
            while c < chunks:
                a0, a1, a2, a3 = load_words(x[t], c)
                b0, b1, b2, b3 = load_words(residual[t], c)
                r0 = pack_bf16(bf16_lo(a0) + bf16_lo(b0), bf16_hi(a0) + bf16_hi(b0))
                r1 = pack_bf16(bf16_lo(a1) + bf16_lo(b1), bf16_hi(a1) + bf16_hi(b1))
                r2 = pack_bf16(bf16_lo(a2) + bf16_lo(b2), bf16_hi(a2) + bf16_hi(b2))
                r3 = pack_bf16(bf16_lo(a3) + bf16_lo(b3), bf16_hi(a3) + bf16_hi(b3))
                if cuda.blockIdx.x == 0:
                    store_words(new_residual[t], c, r0, r1, r2, r3)
                xs[xs_at(t, 0, c, span)], xs[xs_at(t, 1, c, span)] = r0, r1
                xs[xs_at(t, 2, c, span)], xs[xs_at(t, 3, c, span)] = r2, r3
                for r in (r0, r1, r2, r3):
                    sq += bf16_lo(r) * bf16_lo(r) + bf16_hi(r) * bf16_hi(r)
                c += cuda.blockDim.x
            sq = warp_sum(sq)
            if lane == 0:
                partials[warp * tokens + t] = sq
        cuda.syncthreads()
        inv_width = numba.float32(1.0) / numba.float32(8 * chunks)
        for t in range(tokens):  # x <- residual / rms * norm weight, rounded to bf16 (each thread its own words)
            total = numba.float32(0.0)
            for w in range(warps):
                total += partials[w * tokens + t]
            inv_rms = numba.float32(1.0) / math.sqrt(total * inv_width + eps)
            c = cuda.threadIdx.x
            while c < chunks:
                w0, w1, w2, w3 = load_words(norm_weight, c)
                for j, wj in ((0, w0), (1, w1), (2, w2), (3, w3)):
                    r = xs[xs_at(t, j, c, span)]
                    xs[xs_at(t, j, c, span)] = pack_bf16((bf16_lo(r) * inv_rms) * bf16_lo(wj),
                                                         (bf16_hi(r) * inv_rms) * bf16_hi(wj))
                c += cuda.blockDim.x
        cuda.syncthreads()
        rows(weight, out, xs, n, lane, wr, acc)

    kernel = silu_kernel if prologue == "silu" else add_norm_kernel
    kernel.__name__ = kernel.__qualname__ = f"gemv_{prologue}_bf16_c{cpl}_t{tokens}"
    return mark(cuda.jit(fastmath=True)(kernel))


_SILU_SIG = "void(complex128[:, ::1], complex128[:, ::1], bfloat16[:, ::1])"
_ADD_NORM_SIG = ("void(complex128[:, ::1], complex128[:, ::1], complex128[::1], float32, complex128[:, ::1], "
                 "bfloat16[:, ::1], complex128[:, ::1])")
# Qwen3-0.6B at batch 1: add + norm before K = 1,024 (4 chunks per lane), SiLU·mul before K = 3,072 (12)
SIGNATURES.update({_prologue_kernel(4, 1, "add_norm"): [_ADD_NORM_SIG], _prologue_kernel(12, 1, "silu"): [_SILU_SIG]})


def prologue_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the prologue kernels take ``x`` (the gemv's prepared input, (tokens, K)) and ``weight``: what
    :func:`supported` asks, plus room for x in shared memory."""
    return supported(x, weight) and x.numel() * 2 <= MAX_SHARED


def silu_supported(gate_up: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`gemv_silu` takes these operands: gate_up (tokens, 2K) contiguous, x = SiLU·mul (tokens, K)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous():
        return False
    k = gate_up.shape[1] // 2
    return (gate_up.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[1] == k and k % 8 == 0 and 1 <= gate_up.shape[0] <= MAX_TOKENS
            and cdiv(k // 8, 32) <= MAX_CPL and weight.is_contiguous() and aligned16(gate_up, weight)
            and gate_up.shape[0] * k * 2 <= MAX_SHARED)


def add_norm_supported(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                       weight: torch.Tensor) -> bool:
    """Whether :func:`gemv_add_norm` takes these operands."""
    return (prologue_supported(x, weight) and residual.shape == x.shape and residual.dtype == x.dtype
            and residual.is_contiguous() and norm_weight.shape == (x.shape[1],) and norm_weight.dtype == x.dtype
            and norm_weight.is_contiguous() and aligned16(residual, norm_weight))


def _launch_prologue(prologue: str, x_shape, weight, args, out, backend, after=()) -> None:
    tokens, k = x_shape
    kernel = _prologue_kernel(cdiv(k // 8, 32), tokens, prologue)
    warps = WARPS if backend == "gpu" else 1
    blocks = cdiv(weight.shape[0], warps) if backend == "gpu" else min(cdiv(weight.shape[0], warps), 2)
    launch(kernel, blocks, 32 * warps, *args, weight.view(torch.complex128), out, *after, backend=backend)


def gemv_silu_ref(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul(gate_up) @ weight.T``, SiLU·mul rounded to the dtype as the separate kernel does."""
    from kernels.activation import silu_and_mul_ref

    return gemv_ref(silu_and_mul_ref(gate_up), weight)


def gemv_silu(gate_up: torch.Tensor, weight: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``down_proj(silu(gate) * up)`` in one kernel: gate_up (tokens, 2K) [gate | up], weight (N, K) ->
    (tokens, N), bf16, 1 to ``MAX_TOKENS`` tokens."""
    check_tensor("gate_up", gate_up, dtypes=(torch.bfloat16,), ndim=2)
    check_tensor("weight", weight, dtypes=(torch.bfloat16,), ndim=2, device=gate_up.device)
    tokens, k = gate_up.shape[0], gate_up.shape[1] // 2
    if not silu_supported(gate_up, weight):
        raise ValueError(f"gemv_silu takes a contiguous (tokens, 2K) gate_up of 1..{MAX_TOKENS} tokens, K % 8 == 0, "
                         f"K equal to weight's and tokens x K bf16 within {MAX_SHARED} bytes; got gate_up "
                         f"{tuple(gate_up.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty((tokens, weight.shape[0]), dtype=gate_up.dtype, device=gate_up.device)
    where = resolve_backend(backend, gate_up, weight, out)
    if where == "torch":
        return out.copy_(gemv_silu_ref(gate_up, weight))
    _launch_prologue("silu", (tokens, k), weight, (gate_up.view(torch.complex128),), out, where)
    return out


def gemv_add_norm_ref(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) @ weight.T, x + residual)``, rounded where the separate kernels round."""
    from kernels.rmsnorm import fused_add_rms_norm_ref

    normed, new_residual = fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    return gemv_ref(normed, weight), new_residual


def gemv_add_norm(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, *, rows_per_warp: int | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The fused add + RMSNorm and the matmul after it, in one kernel, out of place: x, residual (tokens, K),
    norm_weight (K,), weight (N, K) -> ``(rms_norm(x + residual) @ weight.T, x + residual)``.

    ``rows_per_warp`` None: the block-wide kernel (x prepared in shared memory); 1, 2 or 4: the per-warp register
    kernel (one token only) with that many output rows per warp."""
    if rows_per_warp is not None and (rows_per_warp not in (1, 2, 4) or x.dim() != 2 or x.shape[0] != 1):
        raise ValueError(f"gemv_add_norm's per-warp kernel takes one token and 1, 2 or 4 rows per warp; got "
                         f"x {tuple(x.shape)}, rows_per_warp {rows_per_warp}")
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2)
    for name, t in (("residual", residual), ("norm_weight", norm_weight), ("weight", weight)):
        check_tensor(name, t, dtypes=(torch.bfloat16,), device=x.device)
    if not add_norm_supported(x, residual, norm_weight, weight):
        raise ValueError(f"gemv_add_norm takes contiguous x and residual of one shape (tokens, K), 1..{MAX_TOKENS} "
                         f"tokens, K % 8 == 0, a (K,) norm weight, W (N, K), tokens x K bf16 within {MAX_SHARED} "
                         f"bytes; got x {tuple(x.shape)}, residual {tuple(residual.shape)}, norm weight "
                         f"{tuple(norm_weight.shape)}, weight {tuple(weight.shape)}")
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x)
    where = resolve_backend(backend, x, residual, norm_weight, weight, out)
    if where == "torch":
        want, res = gemv_add_norm_ref(x, residual, norm_weight, eps, weight)
        return out.copy_(want), new_residual.copy_(res)
    args = (x.view(torch.complex128), residual.view(torch.complex128), norm_weight.view(torch.complex128),
            numba.float32(eps))
    if rows_per_warp is None:
        _launch_prologue("add_norm", x.shape, weight, args, out, where,
                         after=(new_residual.view(torch.complex128),))
        return out, new_residual
    kernel = _warp_norm_kernel(cdiv(x.shape[1] // 8, 32), rows_per_warp)
    warps = WARPS if where == "gpu" else 1
    blocks = cdiv(cdiv(weight.shape[0], rows_per_warp), warps)  # no grid stride: every row has its warp
    launch(kernel, blocks, 32 * warps, *args, weight.view(torch.complex128), out, new_residual.view(torch.complex128),
           backend=where)
    return out, new_residual


# ----------------------------------------------------------------------------- add + RMSNorm per warp, in registers
# The block-wide prologue above makes every block stop at two barriers before its first multiply. At one token x is
# 1,024 values: the 32 lanes of a warp hold all of it in registers already (lane ``l`` loads chunks ``l, l + 32,
# ...``, exactly the chunks its weight row meets), so a warp can add the residual, sum the squares over its own
# lanes (five shuffles), scale and round -- no shared memory, no barrier -- and then multiply, ``rows`` output rows
# per warp (all their weight loads issued before the wait) to spread that work and keep the grid in one wave. Rounded
# where the separate kernels round. Measured on the H100 (commit cc446ba, h100/17_gemv_cuda_session18.json and
# h100/12_latency_cuda_add_norm_warp.json), it loses too: per call in a PDL chain of 8 (one graph), qkv_proj's shape
# 8.28 / 6.67 / 5.57 us at 1 / 2 / 4 rows a warp against 3.52 for fused_add_rms_norm + gemv, gate_up_proj's 10.60 /
# 6.70 / 6.59 against 5.00; wired into the decoder layers, batch-1 decode took 1.224 / 1.119 / 1.179 ms/token against
# 0.950 for the two launches. With PDL the norm kernel overlaps the gemv's weight loads and costs little in the chain
# (the pair 3.52 us; the gemv alone, timed outside a chain in 17_gemv_cuda.json, 3.69); folded in, the norm's loads
# and reduction sit on the gemv's critical path after its wait. Not wired in.


@functools.cache
def _warp_norm_kernel(cpl: int, rows: int):
    """The add + RMSNorm + gemv kernel with x prepared per warp in registers; ``rows`` output rows per warp."""
    from kernels._vec16 import pack_bf16, store_words

    words, row_words = 4 * cpl, 4 * cpl * rows  # constants for numba: the local arrays' sizes

    def kernel(x, residual, norm_weight, eps, weight, out, new_residual):
        # x, residual, new_residual: (1, K // 8) complex128; norm_weight: (K // 8,); weight: (N, K // 8); out: (1, N)
        wr = cuda.local.array(row_words, numba.int32)  # this lane's chunks of the warp's rows of W
        xw = cuda.local.array(words, numba.int32)  # this lane's chunks of x + residual, then of the normalized x
        lane = cuda.threadIdx.x % 32
        chunks, n_rows = weight.shape[1], weight.shape[0]
        first = (cuda.blockIdx.x * (cuda.blockDim.x // 32) + cuda.threadIdx.x // 32) * rows
        pdl_trigger()
        for r in range(rows):  # every weight load first: rows x cpl x 16 bytes in flight per lane
            for i in range(cpl):
                c = lane + 32 * i
                j = r * words + 4 * i
                if first + r < n_rows and c < chunks:
                    wr[j], wr[j + 1], wr[j + 2], wr[j + 3] = load_words(weight[first + r], c)
                else:
                    wr[j] = wr[j + 1] = wr[j + 2] = wr[j + 3] = 0
        pdl_wait()  # x and the residual are the previous kernels' outputs
        sq = numba.float32(0.0)
        for i in range(cpl):  # x + residual, rounded to bf16 (the new residual), and its sum of squares
            c = lane + 32 * i
            if c < chunks:
                a0, a1, a2, a3 = load_words(x[0], c)
                b0, b1, b2, b3 = load_words(residual[0], c)
                r0 = pack_bf16(bf16_lo(a0) + bf16_lo(b0), bf16_hi(a0) + bf16_hi(b0))
                r1 = pack_bf16(bf16_lo(a1) + bf16_lo(b1), bf16_hi(a1) + bf16_hi(b1))
                r2 = pack_bf16(bf16_lo(a2) + bf16_lo(b2), bf16_hi(a2) + bf16_hi(b2))
                r3 = pack_bf16(bf16_lo(a3) + bf16_lo(b3), bf16_hi(a3) + bf16_hi(b3))
                if first == 0:
                    store_words(new_residual[0], c, r0, r1, r2, r3)
                xw[4 * i], xw[4 * i + 1], xw[4 * i + 2], xw[4 * i + 3] = r0, r1, r2, r3
                for v in (r0, r1, r2, r3):
                    sq += bf16_lo(v) * bf16_lo(v) + bf16_hi(v) * bf16_hi(v)
        sq = warp_sum(sq)  # the whole row's: the warp's lanes hold all of it
        inv_rms = numba.float32(1.0) / math.sqrt(sq / numba.float32(8 * chunks) + eps)
        for i in range(cpl):  # x <- residual / rms * norm weight, rounded to bf16, as rms_norm_ref rounds
            c = lane + 32 * i
            if c < chunks:
                w0, w1, w2, w3 = load_words(norm_weight, c)
                for k, wk in ((0, w0), (1, w1), (2, w2), (3, w3)):
                    v = xw[4 * i + k]
                    xw[4 * i + k] = pack_bf16((bf16_lo(v) * inv_rms) * bf16_lo(wk),
                                              (bf16_hi(v) * inv_rms) * bf16_hi(wk))
        for r in range(rows):
            acc = numba.float32(0.0)
            for i in range(cpl):
                if lane + 32 * i < chunks:
                    acc = chunk_dot(acc, wr, r * cpl + i, xw[4 * i], xw[4 * i + 1], xw[4 * i + 2], xw[4 * i + 3])
            total = warp_sum(acc)
            if lane == 0 and first + r < n_rows:
                out[0, first + r] = total

    kernel.__name__ = kernel.__qualname__ = f"gemv_add_norm_warp_bf16_c{cpl}_r{rows}"
    return mark(cuda.jit(fastmath=True)(kernel))


SIGNATURES.update({_warp_norm_kernel(4, r): [_ADD_NORM_SIG] for r in (1, 2, 4)})  # Qwen3-0.6B: K = 1,024


# ----------------------------------------------------------------------------- weights fetched into L2 ahead of use
# At batch 1 only a layer's matmuls stream memory; its norms, QK-norm + RoPE and attention are latency-bound kernels
# during which HBM idles. ``l2_prefetch`` asks the GPU to bring weights into its L2 cache (50 MB on an H100/H200:
# a Qwen3-0.6B layer's four matrices are 31.5 MB) without waiting for them: each thread issues
# ``prefetch.global.L2`` for a few 128-byte lines and exits. Launched on a side stream of the CUDA graph at the
# start of a layer for the layer's o_proj, gate_up_proj and down_proj (``minivllm.model.layers.l2_prefetch_fork``),
# the lines arrive while the main stream runs the norm, qkv_proj, QK-norm + RoPE and attention, and those three
# matmuls then read L2 instead of HBM. ``ENGINE_L2_PREFETCH`` switches it; it only changes where the bytes come from.
ENGINE_L2_PREFETCH = False  # off until measured on a GPU (bench.latency's cuda_graphs_l2_prefetch against cuda_graphs)
L2_LINE_CHUNKS = 8  # 16-byte chunks per 128-byte cache line

if config.ENABLE_CUDASIM:
    @cuda.jit(device=True, inline=True)
    def prefetch_l2(chunks, j):
        """A hint, with nothing to compute: the simulator has no cache to warm."""
        return None
else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic
    from numba.core import types as _types

    @intrinsic
    def prefetch_l2(typingctx, chunks, j):
        """``prefetch.global.L2`` of the line holding ``chunks[j]`` (complex128, global memory): no register waits."""
        from kernels._mma import _element_address

        def codegen(context, builder, sig, args):
            address = _element_address(context, builder, sig.args[0], args[0], args[1])
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ir.IntType(64)]),
                               "{ .reg .u64 g; cvta.to.global.u64 g, $0; prefetch.global.L2 [g]; }", "l",
                               side_effect=True)
            builder.call(asm, [address])
            return context.get_dummy_value()

        return _types.void(chunks, j), codegen


@cuda.jit
def l2_prefetch_kernel(a, b, c):
    """Every 128-byte line of ``a``, ``b`` and ``c`` (1-D complex128) requested into L2: a grid-stride loop each."""
    step = cuda.gridDim.x * cuda.blockDim.x * L2_LINE_CHUNKS
    first = cuda.grid(1) * L2_LINE_CHUNKS
    j = first
    while j < a.size:
        prefetch_l2(a, j)
        j += step
    j = first
    while j < b.size:
        prefetch_l2(b, j)
        j += step
    j = first
    while j < c.size:
        prefetch_l2(c, j)
        j += step


SIGNATURES[l2_prefetch_kernel] = ["void(complex128[::1], complex128[::1], complex128[::1])"]
PREFETCH_THREADS = 256


def prefetch_supported(*weights: torch.Tensor) -> bool:
    """Whether :func:`l2_prefetch` takes these tensors: three, contiguous, 16-byte aligned, whole 16-byte chunks."""
    return (len(weights) == 3 and all(w.is_contiguous() and w.nbytes % 16 == 0 for w in weights)
            and aligned16(*weights))


def l2_prefetch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, backend: str = "auto") -> None:
    """Ask L2 for every byte of three contiguous tensors (a hint: returns at once, changes no value)."""
    if not prefetch_supported(a, b, c):
        raise ValueError("l2_prefetch takes three contiguous, 16-byte aligned tensors of whole 16-byte chunks")
    where = resolve_backend(backend, a, b, c)
    if where != "gpu":
        return  # no cache to warm: the simulator and the CPU do nothing
    lines = cdiv(max(a.nbytes, b.nbytes, c.nbytes), 16 * L2_LINE_CHUNKS)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    blocks = max(1, min(cdiv(lines, PREFETCH_THREADS), 2 * sms))
    flat = [t.reshape(-1).view(torch.complex128) for t in (a, b, c)]
    launch(l2_prefetch_kernel, blocks, PREFETCH_THREADS, *flat, backend=where)


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
