"""SiLU-and-mul, the activation of a SwiGLU MLP (Qwen3, Llama), in one pass over memory.

Qwen3's MLP is ``down(silu(gate(x)) * up(x))``. As in vLLM, the gate and up projections are one matmul
whose output row holds ``[gate | up]``, each ``inter`` wide; this kernel reads that row once and writes
the product, half as wide:

    out[t, i] = silu(g) * u,   g = gate_up[t, i],  u = gate_up[t, inter + i],  silu(g) = g / (1 + exp(-g))

The math is fp32 (bf16 and fp16 inputs are widened); each result is rounded once to the input's dtype.

Kernels -- grid-stride loops over the output, so any grid covers any shape (the simulator runs a tiny one):

* ``silu_and_mul_kernel``: one thread per output value, 2 to 4 bytes per load; notebook 05 starts here.
* ``silu_and_mul_bf16_kernel``, ``_f16_kernel``, ``_f32_kernel``: one thread per 16 bytes of output. It
  loads one 16-byte word of gate and one of up (8 bf16/fp16 or 4 fp32 values, ``kernels._vec16``) and
  stores one. They need ``inter % 8 == 0`` (fp32: ``% 4``) and 16-byte aligned tensors; otherwise the
  launcher takes the scalar kernel.

All are compiled with ``fastmath=True``: ``exp`` becomes one ``ex2.approx`` and the division an approximate
one (a few ulp of fp32, invisible after rounding to bf16), and subnormals flush to zero. With the exact
``expf`` and IEEE division, 8 values per 16-byte word cost more instructions than HBM leaves time for: on
the H200 the bf16 kernel ran at 2.9 TB/s exact and 3.6 TB/s fast (4096 tokens, inter 3072). Inputs must
be finite: under fast math, inf and NaN are not propagated faithfully.

Limits: ``gate_up`` contiguous, ``(..., 2 * inter)``; no other activations (GELU-and-mul), no clamped
SwiGLU, no quantised output (vLLM fuses fp8 quantisation here). ``python -m kernels.activation`` checks
both paths against the reference and times them.
"""

import math
from collections.abc import Callable

import numba
import numpy as np
import torch
from numba import cuda

from kernels._checks import FLOAT_DTYPES, check_tensor
from kernels._launch import cdiv, launch, resolve_backend
from kernels._vec16 import aligned16, bf16_hi, bf16_lo, f32, f32_word, load_words, pack_bf16, store_words

GPU_THREADS = 128  # threads per block on the GPU; 128 to 512 ran within 3 % of each other on the H200


# ----------------------------------------------------------------------------- references
def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with torch ops, fp32 math: (..., 2 * inter) -> (..., inter)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


def mlp_ref(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, *,
            act: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul_ref) -> torch.Tensor:
    """Qwen3's MLP, ``down(silu(gate(x)) * up(x))``, with the gate and up projections fused in one matmul.

    ``x``: (tokens, hidden); ``w_gate_up``: (2 * inter, hidden), the gate's rows then the up's (``nn.Linear``
    layout); ``w_down``: (hidden, inter). ``act`` is where silu_and_mul sits (pass the kernel's launcher).
    """
    gate_up = torch.nn.functional.linear(x, w_gate_up)  # (tokens, 2 * inter)
    return torch.nn.functional.linear(act(gate_up), w_down)  # (tokens, inter) -> (tokens, hidden)


# ----------------------------------------------------------------------------- scalar kernel
@cuda.jit(device=True, inline=True)
def silu_mul(g, u):
    """``silu(g) * u`` in fp32."""
    return g / (numba.float32(1.0) + math.exp(-g)) * u


@cuda.jit(fastmath=True)
def silu_and_mul_kernel(gate_up, out):
    # gate_up: (tokens, 2 * inter), out: (tokens, inter)
    inter = out.shape[1]
    j = cuda.grid(1)
    while j < out.size:  # grid-stride over the outputs, row by row
        t = j // inter  # token
        i = j - t * inter  # column
        out[t, i] = silu_mul(numba.float32(gate_up[t, i]), numba.float32(gate_up[t, inter + i]))
        j += cuda.gridsize(1)


# ----------------------------------------------------------------------------- 16-byte kernels
@cuda.jit(device=True, inline=True)
def silu_mul_bf16x2(g, u):
    """Two bf16 pairs in 32-bit words: ``g`` = (gate[i], gate[i+1]), ``u`` likewise; returns the product's word."""
    return pack_bf16(silu_mul(bf16_lo(g), bf16_lo(u)), silu_mul(bf16_hi(g), bf16_hi(u)))


@cuda.jit(device=True, inline=True)
def silu_mul_f16x2(g, u):
    """``silu_mul_bf16x2`` for fp16: a local array reinterprets the bits (it lives in registers)."""
    words = cuda.local.array(2, numba.int32)
    words[0], words[1] = g, u
    h = words.view(np.float16)  # (gate[i], gate[i+1], up[i], up[i+1])
    h[0] = silu_mul(numba.float32(h[0]), numba.float32(h[2]))  # rounded to the nearest fp16
    h[1] = silu_mul(numba.float32(h[1]), numba.float32(h[3]))
    return words[0]


@cuda.jit(device=True, inline=True)
def silu_mul_f32(g, u):
    """One fp32 value per word."""
    return f32_word(silu_mul(f32(g), f32(u)))


def vector_kernel(word_fn, dtype: str):
    """A 16-byte silu-and-mul kernel for ``dtype`` from ``word_fn``: (gate word, up word) -> output word."""

    def kernel(gate_up, out, chunks):
        # gate_up: (tokens * 2 * chunks,) complex128, out: (tokens * chunks,) -- 16-byte words, `chunks` per half row
        j = cuda.grid(1)
        while j < out.size:  # grid-stride over the output words
            g = j + (j // chunks) * chunks  # token t's gate word: t * 2 * chunks + column; its up word: g + chunks
            g0, g1, g2, g3 = load_words(gate_up, g)
            u0, u1, u2, u3 = load_words(gate_up, g + chunks)
            store_words(out, j, word_fn(g0, u0), word_fn(g1, u1), word_fn(g2, u2), word_fn(g3, u3))
            j += cuda.gridsize(1)

    kernel.__name__ = kernel.__qualname__ = f"silu_and_mul_{dtype}_kernel"
    return cuda.jit(fastmath=True)(kernel)


silu_and_mul_bf16_kernel = vector_kernel(silu_mul_bf16x2, "bf16")
silu_and_mul_f16_kernel = vector_kernel(silu_mul_f16x2, "f16")
silu_and_mul_f32_kernel = vector_kernel(silu_mul_f32, "f32")

VECTOR_KERNELS = {torch.bfloat16: silu_and_mul_bf16_kernel, torch.float16: silu_and_mul_f16_kernel,
                  torch.float32: silu_and_mul_f32_kernel}
SIGNATURES = {
    silu_mul: ["float32(float32, float32)"],
    silu_and_mul_kernel: [f"void({d}[:, ::1], {d}[:, ::1])" for d in ("float32", "float16", "bfloat16")],
    silu_mul_bf16x2: ["int32(int32, int32)"],
    silu_mul_f16x2: ["int32(int32, int32)"],
    silu_mul_f32: ["int32(int32, int32)"],
    **{k: ["void(complex128[::1], complex128[::1], int64)"] for k in VECTOR_KERNELS.values()},
}


# ----------------------------------------------------------------------------- launcher
def vector_width(dtype: torch.dtype) -> int:
    """Values of ``dtype`` in one 16-byte word: 8 for bf16 and fp16, 4 for fp32."""
    return 16 // torch.empty(0, dtype=dtype).element_size()


def can_vectorize(gate_up: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the 16-byte kernels fit: half a row is whole words, and both tensors start 16-byte aligned."""
    inter = out.shape[-1]
    return inter % vector_width(out.dtype) == 0 and aligned16(gate_up, out)


def _check_args(gate_up: torch.Tensor, out: torch.Tensor | None) -> tuple[int, ...]:
    """Validate the call; return the output's shape."""
    check_tensor("gate_up", gate_up, dtypes=FLOAT_DTYPES)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError("gate_up's last dimension must be even, [gate | up] of equal widths; "
                         f"got shape {tuple(gate_up.shape)}")
    shape = (*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    if out is not None:
        check_tensor("out", out, dtypes=(gate_up.dtype,), shape=shape, device=gate_up.device)
    return shape


def silu_and_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, vectorized: bool | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` (..., 2 * inter) = [gate | up]; returns (..., inter).

    ``out``: a tensor to write into (e.g. a CUDA graph's static buffer). ``vectorized``: None picks the
    16-byte kernels when they fit (:func:`can_vectorize`), True insists on them, False takes the scalar kernel.
    """
    shape = _check_args(gate_up, out)
    where = resolve_backend(backend, gate_up, *([] if out is None else [out]))
    out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device) if out is None else out
    fits = can_vectorize(gate_up, out)
    if vectorized and not fits:
        raise ValueError(f"vectorized=True needs inter % {vector_width(out.dtype)} == 0 and 16-byte aligned "
                         f"gate_up and out; got inter {shape[-1]}")
    if where == "torch":
        return out.copy_(silu_and_mul_ref(gate_up))
    inter = shape[-1]
    tokens = out.numel() // inter if inter else 0
    if tokens == 0:
        return out
    if fits if vectorized is None else vectorized:
        chunks = inter // vector_width(out.dtype)  # 16-byte words in half a row
        kernel, cols = VECTOR_KERNELS[out.dtype], chunks
        args = (gate_up.view(torch.complex128).view(-1), out.view(torch.complex128).view(-1), chunks)
    else:
        kernel, cols = silu_and_mul_kernel, inter
        args = (gate_up.view(tokens, 2 * inter), out.view(tokens, inter))
    # the simulator costs ~0.2 ms per thread: a few small blocks, and the grid-stride loop does the rest
    threads, cap = (32, 4) if where == "simulator" else (GPU_THREADS, 2**31 - 1)
    launch(kernel, min(cdiv(tokens * cols, threads), cap), threads, *args, backend=where)
    return out


def _main() -> None:
    from kernels._timing import graph_time

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    tokens, inter = (4096, 3072) if on_gpu else (3, 40)  # Qwen3-0.6B's intermediate size on a GPU
    print(f"backend: {resolve_backend('auto', torch.empty(0, device=device))}, {tokens} tokens x inter {inter}")
    for dtype in FLOAT_DTYPES:
        gate_up = torch.randn(tokens, 2 * inter, device=device, dtype=dtype)
        want = silu_and_mul_ref(gate_up)
        for vectorized in (False, True):
            got = silu_and_mul(gate_up, vectorized=vectorized)
            err = (got.float() - want.float()).abs().max().item()
            line = f"{str(dtype)[6:]:9s} {'16 B' if vectorized else 'scalar':6s} max |err| {err:.2e}"
            if on_gpu:
                moved = gate_up.nbytes + want.nbytes
                us = graph_time(lambda: silu_and_mul(gate_up, out=got, vectorized=vectorized)).median_us
                line += f"  {us:7.1f} us  {moved / us / 1e3:6.0f} GB/s (GPU time, CUDA-graph replay)"
            print(line)


if __name__ == "__main__":
    _main()
