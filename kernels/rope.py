"""Rotary position embedding (RoPE) on q and k, in place, in Qwen's and Llama's half-split layout.

A token at position ``p`` has each of its head vectors ``x`` (size ``d``) rotated pair by pair: the pair
``(x[i], x[i + d/2])``, ``i < d/2``, turns by the angle ``p * inv_freq[i]``, ``inv_freq[i] = theta ** (-2i/d)``:

    out[i]       = x[i]       * cos - x[i + d/2] * sin
    out[i + d/2] = x[i + d/2] * cos + x[i]       * sin

(``rotate_half`` in ``transformers``; not GPT-J's interleaved pairs ``(x[2i], x[2i+1])``). The cosines and
sines are a table built once, :func:`rope_cache`: row ``p`` holds the ``d/2`` cosines, then the ``d/2`` sines.
Math is fp32; each result is rounded once to the tensor's dtype.

Kernels -- one pass over q and k, each value read and written once:

* ``rope_kernel``: one thread per (token, head, pair); any even ``d``. Notebook 04 starts from it.
* ``rope_bf16_kernel``, ``rope_f16_kernel``, ``rope_f32_kernel``: 16 bytes per load and store. A thread
  rotates 8 pairs (fp32: 4) of up to 8 heads of one token, reading its cos and sin once; each
  ``x[i:i+8]`` is one 16-byte word (``kernels._vec16``). They need ``d % 16 == 0`` (fp32: ``d % 8 == 0``)
  and 16-byte aligned tensors, else the launcher takes ``rope_kernel``.

Positions are per token (a batch mixes sequences at different positions), int32 or int64. A position
outside the table is an error. With CPU tensors (reference, simulator) :func:`apply_rope` raises
``ValueError`` before launching; with CUDA tensors it does not synchronise to look, and the kernels write
NaN into that token's q and k instead of reading outside the table (the reference's indexing fails a
device-side assert instead).

Limits: q ``(tokens, q_heads, d)`` and k ``(tokens, kv_heads, d)`` contiguous and of one dtype; the
whole head is rotated (no partial ``rotary_dim``); no scaling of long contexts (YaRN, NTK); the kernels
read a float32 table. ``python -m kernels.rope`` checks every path against the reference and times it.
"""

import numba
import numpy as np
import torch
from numba import cuda

from kernels._checks import FLOAT_DTYPES, check_tensor
from kernels._launch import cdiv, launch, resolve_backend
from kernels._vec16 import aligned16, bf16_hi, bf16_lo, f32, f32_word, load_words, pack_bf16, store_words

POSITION_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------- reference
def rope_cache(head_dim: int, max_position: int, theta: float, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (max_position, head_dim) table: row p = cos(p * inv_freq), then sin(p * inv_freq).

    Computed in float32 the way ``transformers`` and vLLM do, so its values match theirs.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (d/2,)
    angles = torch.arange(max_position, device=device).float()[:, None] * inv_freq  # (max_position, d/2)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


def check_positions(positions: torch.Tensor, max_position: int) -> None:
    """Raise ValueError if a position is outside [0, max_position). Only CPU tensors (no GPU sync)."""
    if positions.device.type == "cpu" and positions.numel():
        low, high = positions.min().item(), positions.max().item()
        if low < 0 or high >= max_position:
            raise ValueError(f"positions must be in [0, {max_position}) (the rows of cos_sin), "
                             f"got values in [{low}, {high}]")


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with torch ops, out of place: the rotated (q, k)."""
    check_positions(positions, cos_sin.shape[0])
    cos, sin = cos_sin.index_select(0, positions).float()[:, None, :].chunk(2, dim=-1)  # (tokens, 1, d/2)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)  # (tokens, heads, d/2)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------- kernels
@cuda.jit
def rope_kernel(q, k, positions, cos_sin):
    # q: (tokens, q_heads, d), k: (tokens, kv_heads, d), positions: (tokens,), cos_sin: (max_position, d)
    q_heads, half = q.shape[1], q.shape[2] // 2
    n_heads = q_heads + k.shape[1]
    g = cuda.grid(1)
    while g < positions.size * n_heads * half:  # grid-stride over (token, head, pair)
        i = g % half  # this thread's pair: (i, i + half)
        h = (g // half) % n_heads  # q's heads first, then k's
        t = g // (half * n_heads)
        x = q if h < q_heads else k
        h = h if h < q_heads else h - q_heads
        p = positions[t]
        if 0 <= p < cos_sin.shape[0]:
            cos, sin = cos_sin[p, i], cos_sin[p, i + half]
        else:  # outside the table: poison the token with NaN rather than read out of bounds
            cos = sin = numba.float32(np.nan)
        a, b = numba.float32(x[t, h, i]), numba.float32(x[t, h, i + half])
        x[t, h, i] = a * cos - b * sin
        x[t, h, i + half] = b * cos + a * sin
        g += cuda.gridsize(1)


@cuda.jit(device=True, inline=True)
def _head(q, k, t, h, q_heads, kv_heads, words):
    """Head ``h`` of token ``t`` (q's heads first, then k's): its tensor, and its first word there."""
    if h < q_heads:
        return q, (t * q_heads + h) * words
    return k, (t * kv_heads + h - q_heads) * words


@cuda.jit(device=True, inline=True)
def rotate_bf16x2(a, b, c0, c1, s0, s1):
    """Two pairs in bf16 words: ``a`` = (x[i], x[i+1]), ``b`` = (x[i+d/2], x[i+1+d/2]); c, s: fp32 words."""
    a0, a1, b0, b1 = bf16_lo(a), bf16_hi(a), bf16_lo(b), bf16_hi(b)
    cos0, cos1, sin0, sin1 = f32(c0), f32(c1), f32(s0), f32(s1)
    a = pack_bf16(a0 * cos0 - b0 * sin0, a1 * cos1 - b1 * sin1)
    return a, pack_bf16(b0 * cos0 + a0 * sin0, b1 * cos1 + a1 * sin1)


@cuda.jit(device=True, inline=True)
def rotate_f16x2(a, b, c0, c1, s0, s1):
    """``rotate_bf16x2`` for fp16 words: a local array reinterprets the bits (it lives in registers)."""
    words = cuda.local.array(2, numba.int32)
    words[0], words[1] = a, b
    h = words.view(np.float16)  # (x[i], x[i+1], x[i+d/2], x[i+1+d/2])
    a0, a1, b0, b1 = numba.float32(h[0]), numba.float32(h[1]), numba.float32(h[2]), numba.float32(h[3])
    cos0, cos1, sin0, sin1 = f32(c0), f32(c1), f32(s0), f32(s1)
    h[0], h[1] = a0 * cos0 - b0 * sin0, a1 * cos1 - b1 * sin1  # rounded to nearest fp16
    h[2], h[3] = b0 * cos0 + a0 * sin0, b1 * cos1 + a1 * sin1
    return words[0], words[1]


def half_kernel(rotate, nan_word: int):
    """A 16-byte RoPE kernel for a 2-byte dtype from ``rotate`` (two pairs in two words, as ``rotate_bf16x2``).

    ``nan_word`` holds two NaNs of the dtype, written for positions outside the table.
    """

    def kernel(q, k, positions, cos_sin, q_heads, kv_heads, chunks, slices):
        # q: (tokens * q_heads * 2 * chunks,) complex128, k likewise: a head is 2 * chunks words of 8 values
        # cos_sin: (max_position * 4 * chunks,) complex128: a row is d = 16 * chunks fp32
        row = 4 * chunks
        g = cuda.grid(1)
        while g < positions.size * slices * chunks:  # grid-stride over (token, slice of heads, word)
            c = g % chunks  # this thread's values: [8c, 8c + 8) and the same + d/2
            h = (g // chunks) % slices  # and heads h, h + slices, ...
            t = g // (chunks * slices)
            p = positions[t]
            ok = 0 <= p < cos_sin.size // row
            cw = (p if ok else 0) * row + 2 * c  # cos of values 8c..8c+7: two words of 4 fp32
            c0, c1, c2, c3 = load_words(cos_sin, cw)
            c4, c5, c6, c7 = load_words(cos_sin, cw + 1)
            s0, s1, s2, s3 = load_words(cos_sin, cw + 2 * chunks)  # their sines, d/2 further
            s4, s5, s6, s7 = load_words(cos_sin, cw + 2 * chunks + 1)
            while h < q_heads + kv_heads:  # one read of the table serves all of this thread's heads
                x, lo = _head(q, k, t, h, q_heads, kv_heads, 2 * chunks)
                lo += c
                a0, a1, a2, a3 = load_words(x, lo)
                b0, b1, b2, b3 = load_words(x, lo + chunks)
                a0, b0 = rotate(a0, b0, c0, c1, s0, s1)
                a1, b1 = rotate(a1, b1, c2, c3, s2, s3)
                a2, b2 = rotate(a2, b2, c4, c5, s4, s5)
                a3, b3 = rotate(a3, b3, c6, c7, s6, s7)
                if not ok:
                    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = numba.int32(nan_word)
                store_words(x, lo, a0, a1, a2, a3)
                store_words(x, lo + chunks, b0, b1, b2, b3)
                h += slices
            g += cuda.gridsize(1)

    name = rotate.__name__.removeprefix("rotate_").removesuffix("x2")  # rotate_bf16x2 -> rope_bf16_kernel
    kernel.__name__ = kernel.__qualname__ = f"rope_{name}_kernel"
    return cuda.jit(kernel)


rope_bf16_kernel = half_kernel(rotate_bf16x2, 0x7FC07FC0)
rope_f16_kernel = half_kernel(rotate_f16x2, 0x7E007E00)


@cuda.jit(device=True, inline=True)
def _rotate_f32(a, b, c, s):
    """One pair in fp32 words: (a, b) = (x[i], x[i + d/2])."""
    x1, x2, cos, sin = f32(a), f32(b), f32(c), f32(s)
    return f32_word(x1 * cos - x2 * sin), f32_word(x2 * cos + x1 * sin)


@cuda.jit
def rope_f32_kernel(q, k, positions, cos_sin, q_heads, kv_heads, chunks, slices):
    # as half_kernel's, with 4 fp32 per word: a head and a table row are both 2 * chunks words
    row = 2 * chunks
    g = cuda.grid(1)
    while g < positions.size * slices * chunks:
        c = g % chunks
        h = (g // chunks) % slices
        t = g // (chunks * slices)
        p = positions[t]
        ok = 0 <= p < cos_sin.size // row
        c0, c1, c2, c3 = load_words(cos_sin, (p if ok else 0) * row + c)
        s0, s1, s2, s3 = load_words(cos_sin, (p if ok else 0) * row + c + chunks)
        while h < q_heads + kv_heads:
            x, lo = _head(q, k, t, h, q_heads, kv_heads, row)
            lo += c
            a0, a1, a2, a3 = load_words(x, lo)
            b0, b1, b2, b3 = load_words(x, lo + chunks)
            a0, b0 = _rotate_f32(a0, b0, c0, s0)
            a1, b1 = _rotate_f32(a1, b1, c1, s1)
            a2, b2 = _rotate_f32(a2, b2, c2, s2)
            a3, b3 = _rotate_f32(a3, b3, c3, s3)
            if not ok:
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = numba.int32(0x7FC00000)
            store_words(x, lo, a0, a1, a2, a3)
            store_words(x, lo + chunks, b0, b1, b2, b3)
            h += slices
        g += cuda.gridsize(1)


VECTOR_KERNELS = {torch.bfloat16: rope_bf16_kernel, torch.float16: rope_f16_kernel, torch.float32: rope_f32_kernel}
_ROTATE = "(int32, int32, int32, int32, int32, int32)"
_VEC = "void(complex128[::1], complex128[::1], {}[::1], complex128[::1], int64, int64, int64, int64)"
SIGNATURES = {
    rope_kernel: [f"void({x}[:, :, ::1], {x}[:, :, ::1], {p}[::1], float32[:, ::1])"
                  for x in ("float32", "float16", "bfloat16") for p in ("int32", "int64")],
    _head: ["Tuple((complex128[::1], int64))(complex128[::1], complex128[::1], int64, int64, int64, int64, int64)"],
    rotate_bf16x2: ["UniTuple(int32, 2)" + _ROTATE],
    rotate_f16x2: ["UniTuple(int32, 2)" + _ROTATE],
    _rotate_f32: ["UniTuple(int32, 2)(int32, int32, int32, int32)"],
    **{kernel: [_VEC.format(p) for p in ("int32", "int64")] for kernel in VECTOR_KERNELS.values()},
}


# ----------------------------------------------------------------------------- launcher
VECTOR_WIDTH = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}  # values in one 16-byte word
HEADS_PER_THREAD = 8  # the 16-byte kernels' most heads per thread (one table read for them all)
_RESIDENT_THREADS = 132 * 2048  # an H200 full: with fewer items than this, one head per thread


def can_vectorize(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> bool:
    """Whether the 16-byte kernels fit: half a head is whole words, and every tensor starts 16-byte aligned."""
    return q.shape[-1] % (2 * VECTOR_WIDTH[q.dtype]) == 0 and aligned16(q, k, cos_sin)


def _check_args(q, k, positions, cos_sin) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=3)
    tokens, _, d = q.shape
    check_tensor("k", k, dtypes=(q.dtype,), shape=(tokens, None, d), device=q.device)
    check_tensor("positions", positions, dtypes=POSITION_DTYPES, shape=(tokens,), device=q.device)
    check_tensor("cos_sin", cos_sin, dtypes=(torch.float32,), shape=(None, d), device=q.device)
    if d % 2:
        raise ValueError(f"q and k must have an even head_dim, got {d}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, *,
               vectorized: bool | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (tokens, q_heads, d) and k (tokens, kv_heads, d) IN PLACE by their tokens' positions.

    ``cos_sin`` is :func:`rope_cache`'s float32 table. ``vectorized``: None takes the 16-byte kernels when
    they fit (:func:`can_vectorize`), True insists on them, False takes the scalar kernel. Returns (q, k).
    """
    _check_args(q, k, positions, cos_sin)
    where = resolve_backend(backend, q, k, positions, cos_sin)
    check_positions(positions, cos_sin.shape[0])  # CPU tensors only: on a GPU, checking would synchronise
    fits = can_vectorize(q, k, cos_sin)
    if vectorized and not fits:
        raise ValueError(f"vectorized=True needs head_dim % {2 * VECTOR_WIDTH[q.dtype]} == 0 and 16-byte "
                         f"aligned q, k and cos_sin; got head_dim {q.shape[-1]}")
    if where == "torch":
        q_out, k_out = apply_rope_ref(q, k, positions, cos_sin)
        return q.copy_(q_out), k.copy_(k_out)
    tokens, q_heads, d = q.shape
    n_heads = q_heads + k.shape[1]
    if fits if vectorized is None else vectorized:
        chunks = d // 2 // VECTOR_WIDTH[q.dtype]  # 16-byte words in half a head
        few = where == "gpu" and tokens * n_heads * chunks < _RESIDENT_THREADS
        slices = n_heads if few else cdiv(n_heads, HEADS_PER_THREAD)  # a thread takes heads h, h + slices, ...
        kernel, items = VECTOR_KERNELS[q.dtype], tokens * slices * chunks
        args = (q.view(torch.complex128).view(-1), k.view(torch.complex128).view(-1), positions,
                cos_sin.view(torch.complex128).view(-1), q_heads, k.shape[1], chunks, slices)
    else:
        kernel, items, args = rope_kernel, tokens * n_heads * d // 2, (q, k, positions, cos_sin)
    if items:
        # the simulator costs ~0.2 ms per thread: a few small blocks, and the grid-stride loop does the rest
        threads, cap = (64, 4) if where == "simulator" else (128, 2**31 - 1)
        launch(kernel, min(cdiv(items, threads), cap), threads, *args, backend=where)
    return q, k


def _main() -> None:
    from kernels._timing import graph_time

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    tokens, q_heads, kv_heads, d = (16384, 16, 8, 128) if on_gpu else (3, 2, 1, 32)  # Qwen3-0.6B on a GPU
    cos_sin = rope_cache(d, 40960, 1e6, device=device)
    positions = torch.randint(0, 40960, (tokens,), device=device)
    print(f"backend: {resolve_backend('auto', cos_sin)}, {tokens} tokens x ({q_heads} + {kv_heads}) heads x {d}")
    for dtype, vectorized in [(dtype, v) for dtype in FLOAT_DTYPES for v in (False, True)]:
        q, k = (torch.randn(tokens, h, d, device=device, dtype=dtype) for h in (q_heads, kv_heads))
        want = apply_rope_ref(q, k, positions, cos_sin)
        got = apply_rope(q, k, positions, cos_sin, vectorized=vectorized)
        err = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
        line = f"{str(dtype)[6:]:9s} {'16 B' if vectorized else 'scalar':6s} max |err| {err:.2e}"
        if on_gpu:  # GPU time per call (graph replay), bytes read and written
            moved = 2 * (q.nbytes + k.nbytes) + tokens * (positions.element_size() + cos_sin[0].nbytes)
            us = graph_time(lambda: apply_rope(q, k, positions, cos_sin, vectorized=vectorized)).median_us
            line += f"  {us:7.1f} us  {moved / us / 1e3:6.0f} GB/s"
        print(line)


if __name__ == "__main__":
    _main()
