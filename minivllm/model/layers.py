"""The model's element-wise layers, routed to the ``kernels`` launchers: RMSNorm, RoPE, SiLU·mul (and the
linear layers' matmul, :func:`linear`).

Each function here calls the launcher of its kernel module (``kernels.rmsnorm``, ``kernels.rope``,
``kernels.activation``) when that module exists, and otherwise the same math in plain PyTorch (the
references, until a phase's kernel lands). Where a call runs:

* CUDA tensors: the launcher's default, i.e. the numba kernel on the GPU;
* CPU tensors: always ``backend="torch"``, the launcher's PyTorch reference. The CUDA simulator runs a
  kernel thread by thread in Python: fine for a 4 x 64 tensor in a test, hopeless for a whole model.

The launchers are imported on first use (importing numba costs seconds), once per module.
What is left out: attention (``minivllm.model.attention``). The matmuls are PyTorch's (cuBLAS on a GPU), except
that :func:`linear` sends small GPU steps (up to ``kernels.gemv.ENGINE_MAX_TOKENS`` tokens) to ``kernels.gemv``, and
:func:`silu_and_mul_linear` a batch-1 step's SiLU·mul and ``down_proj`` to one kernel of it.
"""

import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


@functools.cache
def kernel_module(module: str):
    """The module ``kernels.<module>``, or None while it does not exist yet."""
    try:
        return importlib.import_module(f"kernels.{module}")
    except ModuleNotFoundError as e:
        if e.name not in ("kernels", f"kernels.{module}"):
            raise  # the module exists but something it imports is missing: say so
        return None


@functools.cache
def launcher(module: str, name: str) -> Callable | None:
    """``kernels.<module>.<name>``, or None while that kernel does not exist yet."""
    return getattr(kernel_module(module), name, None)


# the learner's passed kernels (minivllm.learner.install_kernels), used for CUDA tensors; process-wide:
# the latest engine built decides (LLM(learner=True) fills it, any other engine empties it)
LEARNER_KERNELS: dict[str, Callable] = {}


def _backend(t: torch.Tensor) -> str:
    return "auto" if t.is_cuda else "torch"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension, in fp32; x: (..., n) -> same shape and dtype."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, n): the kernel's layout (one kv head: a strided view)
    if x.is_cuda and "rms_norm" in LEARNER_KERNELS:
        return LEARNER_KERNELS["rms_norm"](rows, weight, eps).view(x.shape)
    fn = launcher("rmsnorm", "rms_norm")
    if fn is not None:
        return fn(rows, weight, eps, backend=_backend(x)).view(x.shape)
    xf = rows.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * out.to(x.dtype)).view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x``, then ``x = rms_norm(residual)``, both IN PLACE; x, residual: (tokens, n)."""
    if x.is_cuda and "fused_add_rms_norm" in LEARNER_KERNELS:
        return LEARNER_KERNELS["fused_add_rms_norm"](x, residual, weight, eps)
    fn = launcher("rmsnorm", "fused_add_rms_norm")
    if fn is not None:
        return fn(x, residual, weight, eps, backend=_backend(x))
    residual.add_(x)
    return x.copy_(rms_norm(residual, weight, eps)), residual


def rope_cache(head_dim: int, max_position: int, theta: float, device: torch.device | str) -> torch.Tensor:
    """The float32 (max_position, head_dim) table: row p = cos(p * inv_freq) | sin(p * inv_freq)."""
    fn = launcher("rope", "rope_cache")
    if fn is not None:
        return fn(head_dim, max_position, theta, device=device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (d/2,)
    angles = torch.arange(max_position, device=device).float()[:, None] * inv_freq  # (max_position, d/2)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (tokens, q_heads, d) and k (tokens, kv_heads, d) IN PLACE, half-split layout."""
    if q.is_cuda and "apply_rope" in LEARNER_KERNELS:
        return LEARNER_KERNELS["apply_rope"](q, k, positions, cos_sin)
    fn = launcher("rope", "apply_rope")
    if fn is not None:
        return fn(q, k, positions, cos_sin, backend=_backend(q))
    cos, sin = cos_sin[positions][:, None, :].chunk(2, dim=-1)  # (tokens, 1, d/2) each
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    return q, k


def qkv_prep_supported(head_dim: int) -> bool:
    """Whether ``kernels.qkv_prep`` exists and takes this head size."""
    fn = launcher("qkv_prep", "supported")
    return fn is not None and fn(head_dim)


def qkv_prep(qkv: torch.Tensor, q_heads: int, kv_heads: int, positions: torch.Tensor, cos_sin: torch.Tensor,
             kv_cache: torch.Tensor, slot_mapping: torch.Tensor, q_weight: torch.Tensor | None,
             k_weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QK-norm (with weights), RoPE and the KV store of one layer in one kernel: ``kernels.qkv_prep``."""
    return launcher("qkv_prep", "qkv_prep")(qkv, q_heads, kv_heads, positions, cos_sin, kv_cache, slot_mapping,
                                           q_weight, k_weight, eps, backend=_backend(qkv))


def decode_prep_fits(qkv: torch.Tensor, kv_cache: torch.Tensor, head_dim: int, q_heads: int, kv_heads: int) -> bool:
    """Whether a decode step's layer prepares its inputs inside the attention kernel (``kernels.paged_decode_prep``:
    QK-norm, RoPE, the KV store and attention in one launch): its switch ``ENGINE`` on, a step of up to
    ``ENGINE_MAX_SEQS`` sequences, the shapes it takes, and no learner's attention kernel to run instead."""
    module = kernel_module("paged_decode_prep")
    return (module is not None and module.ENGINE and qkv.shape[0] <= module.ENGINE_MAX_SEQS
            and "paged_attention" not in LEARNER_KERNELS and module.fits(qkv, kv_cache, head_dim, q_heads, kv_heads))


def paged_decode_prep(qkv: torch.Tensor, q_heads: int, kv_heads: int, positions: torch.Tensor,
                      cos_sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, q_weight: torch.Tensor | None,
                      k_weight: torch.Tensor | None, eps: float, max_context_len: int) -> torch.Tensor:
    """QK-norm, RoPE, the KV store and decode attention in one kernel: ``kernels.paged_decode_prep``."""
    return launcher("paged_decode_prep", "paged_decode_prep")(
        qkv, q_heads, kv_heads, positions, cos_sin, kv_cache, slot_mapping, block_tables, context_lens, q_weight,
        k_weight, eps, max_context_len=max_context_len, backend=_backend(qkv))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T``: cuBLAS (``F.linear``), or on a GPU for a step of at most ``kernels.gemv.ENGINE_MAX_TOKENS``
    tokens the matrix-vector kernel ``kernels.gemv``."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] <= _gemv_tokens():
        fn = launcher("gemv", "supported")
        if fn is not None and fn(x, weight):
            return launcher("gemv", "gemv")(x, weight)
    return F.linear(x, weight)


def _gemv_tokens() -> int:
    """``kernels.gemv.ENGINE_MAX_TOKENS``, read at call time (a benchmark switches it); 0 without that module."""
    module = kernel_module("gemv")
    return 0 if module is None else module.ENGINE_MAX_TOKENS


_side_streams: dict = {}


def l2_prefetch_fork(x: torch.Tensor, weights: Callable[[], tuple[torch.Tensor, ...]]):
    """While a GPU step of at most ``kernels.gemv.ENGINE_MAX_TOKENS`` tokens is being captured into a CUDA graph
    (``ENGINE_L2_PREFETCH`` on): start ``kernels.gemv.l2_prefetch`` of ``weights`` on a side stream, a branch of the
    graph beside the main stream's kernels, and return that stream for :func:`l2_prefetch_join`; else None.
    ``weights()`` gives the tensors (none: nothing to fetch); it is called only when the rest holds.

    Only under capture: in a replayed graph the branch costs nothing on the host, eagerly it would cost a launch."""
    if not (x.is_cuda and 0 < x.shape[0] <= _gemv_tokens()):
        return None
    module = kernel_module("gemv")
    if not (module.ENGINE_L2_PREFETCH and torch.cuda.is_current_stream_capturing()):
        return None
    weights = weights()
    if not (weights and module.prefetch_supported(*weights)):
        return None
    main = torch.cuda.current_stream(x.device)
    side = _side_streams.get(x.device)
    if side is None:
        side = _side_streams[x.device] = torch.cuda.Stream(x.device)
    side.wait_stream(main)  # the fork: the branch starts after what the main stream has recorded so far
    with torch.cuda.stream(side):
        module.l2_prefetch(*weights)
    return side


def l2_prefetch_join(side) -> None:
    """The main stream waits for the prefetch branch (a graph capture must end with every branch joined)."""
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)


def silu_and_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``linear(silu_and_mul(gate_up), weight)``; a GPU step of up to ``kernels.gemv.PROLOGUE_MAX_TOKENS`` tokens in
    one kernel (``kernels.gemv.gemv_silu``) while ``ENGINE_SILU_PROLOGUE`` is on and no learner's SiLU·mul runs."""
    n = gate_up.shape[0] if gate_up.dim() == 2 else -1
    if gate_up.is_cuda and 0 < n <= _gemv_tokens() and "silu_and_mul" not in LEARNER_KERNELS:
        module = kernel_module("gemv")
        if (module.ENGINE_SILU_PROLOGUE and n <= module.PROLOGUE_MAX_TOKENS
                and module.silu_supported(gate_up, weight)):
            return module.gemv_silu(gate_up, weight)
    return linear(silu_and_mul(gate_up), weight)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: (tokens, 2 * n) holding [gate | up] -> silu(gate) * up, (tokens, n)."""
    if gate_up.is_cuda and "silu_and_mul" in LEARNER_KERNELS:
        return LEARNER_KERNELS["silu_and_mul"](gate_up)
    fn = launcher("activation", "silu_and_mul")
    if fn is not None:
        return fn(gate_up, backend=_backend(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
