"""A decode step of a block-weight (q4) model on the CPU as a few numba calls per layer on numpy arrays.

At batch 1 on a CPU the matmuls are not the whole step: the model runs ~30 torch ops per layer (RMSNorm as its
reference's six ops, RoPE's ten, the KV store's indexing, reshapes), each a few to tens of microseconds of
dispatch on a small CPU, i.e. about as long as the block kernels themselves (bench/cpu_fast.py ``breakdown``).
:class:`BlockDecoder` runs the same math for a decode-only step (every row one token of its own sequence)
with nine calls per layer, each a numba function on numpy views of the model's own tensors; past
``BlockLinear.max_rows`` rows its four matmuls are fbgemm's fp16 GEMM, as ``BlockLinear``'s own (32 chats on
2 cores, back to back at load ~1.3: 8 requests 106-109 -> 154-158 output tok/s, 32 requests 188-201 -> 243-252)::

    add + RMSNorm ─► qkv (Q4_1) ─► [QK-norm] RoPE, K/V into the paged cache ─► paged decode attention ─►
    o (Q4_1) ─► add + RMSNorm ─► gate_up (Q4_1) ─► SiLU·mul ─► down (Q4_1)

The weights are the model's: the :class:`~minivllm.model.quant.BlockLinear` blocks, the norms' and the RoPE
table's storage (no copies). It returns the final hidden states, as ``Qwen3ForCausalLM.forward`` does; the
LM head stays ``compute_logits``' (one call). Anything else (prefill, a mixed step, a model whose linears are
not all blocks, another dtype) is not accepted, and the module path runs.

Every call uses numba's threads (the core count): on 2 shared cores, one thread for the small calls (qkv, o,
attention) or for all of them measured 5-20% slower (bench/cpu_fast.py's thread sweep covers the whole step).

Left out: fusing the SiLU into the down matmul's input and the norms into the matmuls (one call each is cheap
next to a torch op), and a whole layer in one parallel region (numba cannot nest ``prange`` regions of
separate functions).
"""

import math

import kernels  # noqa: F401  (first: it picks numba's CUDA simulator on a CPU-only machine before numba loads)
import numpy as np
import torch
from numba import njit

from kernels.paged_attention_cpu import _paged_decode_kernel
from minivllm.model.q4 import q4_1_matmul, q8_0_matmul

_f32 = np.float32


@njit(fastmath=True, cache=True)
def _rms_norm(x, w, eps, out):  # pragma: no cover - compiled
    """out = x / rms(x) * w over each row of x (rows, n)."""
    for r in range(x.shape[0]):
        ss = _f32(0.0)
        for i in range(x.shape[1]):
            ss += x[r, i] * x[r, i]
        inv = _f32(1.0) / np.sqrt(ss / _f32(x.shape[1]) + eps)
        for i in range(x.shape[1]):
            out[r, i] = x[r, i] * inv * w[i]


@njit(fastmath=True, cache=True)
def _add_rms_norm(x, residual, w, eps, out):  # pragma: no cover - compiled
    """residual += x, then out = rms_norm(residual) * w (rows, n)."""
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            residual[r, i] += x[r, i]
    _rms_norm(residual, w, eps, out)


@njit(fastmath=True, cache=True)
def _rope_store(qkv, positions, cos_sin, heads, kv_heads, q_norm, k_norm, eps, kv, slots, q_out):  # pragma: no cover
    """Split qkv (tokens, (heads + 2 kv_heads) * d) into q, k, v; QK-norm (if ``q_norm.size``) and RoPE (half-split)
    on q and k; q to q_out (tokens, heads, d), k and v into the paged cache kv (blocks, 2, block_size, kv_heads, d)
    at ``slots`` (-1: not stored)."""
    d = q_out.shape[2]
    half = d // 2
    block_size = kv.shape[2]
    tmp = np.empty(d, np.float32)
    for t in range(qkv.shape[0]):
        p = positions[t]
        slot = slots[t]
        for h in range(heads + 2 * kv_heads):
            base = h * d
            for i in range(d):
                tmp[i] = qkv[t, base + i]
            if h < heads + kv_heads:  # q and k: QK-norm, then RoPE
                w = q_norm if h < heads else k_norm
                if w.size:
                    ss = _f32(0.0)
                    for i in range(d):
                        ss += tmp[i] * tmp[i]
                    inv = _f32(1.0) / np.sqrt(ss / _f32(d) + eps)
                    for i in range(d):
                        tmp[i] = tmp[i] * inv * w[i]
                for i in range(half):
                    c, s = cos_sin[p, i], cos_sin[p, half + i]
                    a, b = tmp[i], tmp[half + i]
                    tmp[i] = a * c - b * s
                    tmp[half + i] = b * c + a * s
            if h < heads:
                for i in range(d):
                    q_out[t, h, i] = tmp[i]
            elif slot >= 0:
                which = 0 if h < heads + kv_heads else 1  # K, then V
                kh = h - heads - which * kv_heads
                blk, off = slot // block_size, slot % block_size
                for i in range(d):
                    kv[blk, which, off, kh, i] = tmp[i]


@njit(fastmath=True, cache=True)
def _silu_mul(gate_up, out):  # pragma: no cover - compiled
    """out = silu(gate) * up, gate_up (rows, 2n) = [gate | up] -> out (rows, n)."""
    n = out.shape[1]
    for r in range(out.shape[0]):
        for i in range(n):
            g = gate_up[r, i]
            out[r, i] = g / (_f32(1.0) + np.exp(-g)) * gate_up[r, n + i]


def _matmul(layer: dict, name: str, x: np.ndarray, y: np.ndarray, max_rows: int) -> None:
    """y = x @ W.T for the layer's linear ``name``: the block kernel up to ``max_rows`` rows, fbgemm fp16 beyond
    (what :class:`~minivllm.model.quant.BlockLinear` itself does)."""
    if x.shape[0] <= max_rows:
        blocks = layer[name]
        (q4_1_matmul if blocks.bits == 4 else q8_0_matmul)(x, *blocks.arrays, y)
    else:
        y[:] = layer["fp16"][name](torch.from_numpy(x)).numpy()


class BlockDecoder:
    """Decode-only steps of a q4 model (see the module docstring); build with :meth:`for_model`."""

    def __init__(self, model, layers: list[dict], max_rows: int):  # the model's own tensors, viewed
        c = model.config
        self.layers, self.max_rows = layers, max_rows
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps = _f32(c.rms_norm_eps)
        self.scale = _f32(1.0 / math.sqrt(c.head_dim))
        self.embed = model.model.embed_tokens.weight.detach().numpy()  # (vocab, H): rows looked up, no copy
        self.final_norm = model.model.norm.weight.detach().numpy()
        self.cos_sin = model.model.rotary_emb.cos_sin.numpy()  # (max_position, d)
        self._kv: tuple[int, list[np.ndarray]] | None = None  # numpy views of the current cache's layers
        self._buffers: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def for_model(cls, model) -> "BlockDecoder | None":
        """A decoder over ``model``'s own weights, or None unless every layer's four linears are blocks (a
        tensor-parallel shard's ``RowParallel`` layers and embedding are not: its all-reduces stay)."""
        from minivllm.model.qwen3 import Embedding
        from minivllm.model.quant import BlockLinear

        if type(model.model.embed_tokens) is not Embedding:  # a tensor-parallel shard: its ranks must talk
            return None
        none = np.empty(0, np.float32)
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = {"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj}
            if not all(isinstance(m, BlockLinear) and m.blocks is not None and m.blocks.padded_out == m.out_features
                       for m in linears.values()):
                return None
            layers.append({**{k: m.blocks for k, m in linears.items()},
                           "fp16": {k: m.fp16 for k, m in linears.items()},  # past max_rows rows: fbgemm's GEMM
                           "in_norm": layer.input_layernorm.weight.detach().numpy(),
                           "post_norm": layer.post_attention_layernorm.weight.detach().numpy(),
                           "q_norm": attn.q_norm.weight.detach().numpy() if attn.q_norm is not None else none,
                           "k_norm": attn.k_norm.weight.detach().numpy() if attn.k_norm is not None else none})
        return cls(model, layers, BlockLinear.max_rows)

    def accepts(self, input_ids: torch.Tensor, meta) -> bool:
        """Whether this step is one this decoder runs: decode-only, a few rows, fp32 paged cache on the CPU."""
        from minivllm.model.paged_attention import PagedAttentionMetadata

        n = input_ids.shape[0]
        return (isinstance(meta, PagedAttentionMetadata) and meta.num_decodes == n and n > 0
                and meta.kv_cache.kv[0].dtype == torch.float32 and not meta.kv_cache.kv[0].is_cuda)

    def _cache(self, meta) -> list[np.ndarray]:
        if self._kv is None or self._kv[0] != id(meta.kv_cache):
            self._kv = (id(meta.kv_cache), [t.numpy() for t in meta.kv_cache.kv])
        return self._kv[1]

    def _buffer(self, n: int) -> dict[str, np.ndarray]:
        if n not in self._buffers:
            first = self.layers[0]
            shapes = {"x": first["qkv"].in_features, "h": first["qkv"].in_features, "res": first["qkv"].in_features,
                      "qkv": first["qkv"].out_features, "attn": self.heads * self.head_dim,
                      "gate_up": first["gate_up"].out_features, "act": first["down"].in_features}
            self._buffers[n] = {k: np.empty((n, width), np.float32) for k, width in shapes.items()}
        return self._buffers[n]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """input_ids, positions (n,) -> the final hidden states (n, hidden): ``Qwen3ForCausalLM.forward``'s."""
        n = input_ids.shape[0]
        buf, kv = self._buffer(n), self._cache(meta)
        ids, pos = input_ids.numpy(), positions.numpy()
        slots = meta.slot_mapping.numpy()
        tables = meta.block_tables[:n].numpy()
        lens = meta.context_lens[:n].numpy()
        x, h, res, qkv, attn = buf["x"], buf["h"], buf["res"], buf["qkv"], buf["attn"]
        q = attn.reshape(n, self.heads, self.head_dim)
        q_rot = np.empty_like(q)
        res[:] = self.embed[ids]  # (n, H): the residual stream starts as the embeddings
        x[:] = 0.0  # what the first layer adds to it
        for i, layer in enumerate(self.layers):
            _add_rms_norm(x, res, layer["in_norm"], self.eps, h)
            _matmul(layer, "qkv", h, qkv, self.max_rows)
            _rope_store(qkv, pos, self.cos_sin, self.heads, self.kv_heads, layer["q_norm"], layer["k_norm"],
                        self.eps, kv[i], slots, q_rot)
            _paged_decode_kernel(q_rot, kv[i], tables, lens, self.scale, q)  # -> attn (n, heads * d)
            _matmul(layer, "o", attn, x, self.max_rows)
            _add_rms_norm(x, res, layer["post_norm"], self.eps, h)
            _matmul(layer, "gate_up", h, buf["gate_up"], self.max_rows)
            _silu_mul(buf["gate_up"], buf["act"])
            _matmul(layer, "down", buf["act"], x, self.max_rows)
        out = np.empty_like(h)
        _add_rms_norm(x, res, self.final_norm, self.eps, out)
        return torch.from_numpy(out)
