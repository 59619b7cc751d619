"""Qwen3 (and the Llama family, SmolLM2 included): a decoder-only transformer on flattened tokens.

One decoder layer, pre-norm, with the residual stream carried beside the hidden states::

    x ─► RMSNorm ─► qkv_proj ─► [q_norm, k_norm] ─► RoPE ─► attention (GQA) ─► o_proj ─► + ─►
      RMSNorm ─► gate_up_proj ─► SiLU(gate) · up ─► down_proj ─► +

``[q_norm, k_norm]`` (RMSNorm over head_dim on every q and k head) is Qwen3's; Llama skips it. On a GPU, in
the engine's paged steps, QK-norm, RoPE and storing K and V are one kernel (``kernels.qkv_prep``; a batch-1 decode
step does them inside its attention kernel, ``kernels.paged_decode_prep``), and a batch-1
step folds the SiLU·mul into ``down_proj`` (``layers.silu_and_mul_linear``, ``kernels.gemv.gemv_silu``).
Everything else is shared. As in vLLM, the model works on a batch of *flattened tokens*,
``input_ids (tokens,)`` with ``positions (tokens,)``, and the attention metadata says which cache
rows belong to whom. ``q, k, v`` are one matmul (``qkv_proj``) and ``gate, up`` another
(``gate_up_proj``): ``minivllm.model.weights`` maps a checkpoint's separate tensors onto those.

RMSNorm, RoPE and SiLU·mul go through ``minivllm.model.layers`` (the ``kernels`` launchers); linear
layers are ``layers.linear`` (``F.linear``, i.e. cuBLAS on a GPU); attention is ``minivllm.model.attention``.
Inference only: parameters never require grad. ``minivllm.model.quant`` swaps the linear layers for 4-bit block (numba) or fbgemm
fp16/int8 ones on a CPU; ``minivllm.distributed`` splits the model over ranks (tensor parallelism).
Left out: LoRA.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.model import layers
from minivllm.model.attention import AttentionMetadata, attention
from minivllm.model.config import ModelConfig
from minivllm.model.paged_attention import PagedAttentionMetadata, paged_attention
from minivllm.model.weights import checkpoint_to_param, load_weights

_UNFUSED = ("rms_norm", "apply_rope", "store_kv")  # a learner's kernel for any of these: run the steps apart


def fuse_qkv_prep(qkv: torch.Tensor, meta, head_dim: int) -> bool:
    """Whether a layer takes the fused QK-norm + RoPE + KV-store kernel (``kernels.qkv_prep``): on a GPU, for the
    engine's paged steps with our kernels (not ``attention_backend="torch"``), unless the learner's kernels run."""
    return (qkv.is_cuda and isinstance(meta, PagedAttentionMetadata) and meta.backend != "torch"
            and not any(name in layers.LEARNER_KERNELS for name in _UNFUSED) and layers.qkv_prep_supported(head_dim))


def _empty(*shape: int, device, dtype) -> nn.Parameter:
    # uninitialised: every value is overwritten by the loader, so no time is spent on a random init
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """``y = x @ W.T`` without bias; W: (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, *, device, dtype):
        super().__init__()
        self.weight = _empty(out_features, in_features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layers.linear(x, self.weight)


class Embedding(nn.Module):
    """Token id -> its row of the (vocab_size, hidden_size) matrix."""

    def __init__(self, vocab_size: int, hidden_size: int, *, device, dtype):
        super().__init__()
        self.weight = _empty(vocab_size, hidden_size, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; with ``residual``, the fused add + norm (both in place)."""

    def __init__(self, size: int, eps: float, *, device, dtype):
        super().__init__()
        self.weight = _empty(size, device=device, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return layers.rms_norm(x, self.weight, self.eps)
        return layers.fused_add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """The RoPE table, computed once and shared by every layer (a buffer, not a weight)."""

    def __init__(self, config: ModelConfig, *, device):
        super().__init__()
        table = layers.rope_cache(config.head_dim, config.max_position_embeddings, config.rope_theta, device)
        self.register_buffer("cos_sin", table, persistent=False)  # (max_position, head_dim) float32

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return layers.apply_rope(q, k, positions, self.cos_sin)


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary_emb: RotaryEmbedding, *, device, dtype):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, device=device, dtype=dtype)
        self.o_proj = Linear(self.q_size, config.hidden_size, device=device, dtype=dtype)
        self.q_norm = self.k_norm = None  # Qwen3's QK-norm; Llama has none
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device=device, dtype=dtype)
        self.rotary_emb = rotary_emb

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None) -> torch.Tensor:
        tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        if fuse_qkv_prep(qkv, attn_metadata, self.head_dim):  # the next three steps in one kernel, K and V stored
            norm = self.q_norm is not None
            meta, kv = attn_metadata, attn_metadata.kv_cache.kv[self.layer]
            if meta.split is None and meta.num_decodes == tokens and layers.decode_prep_fits(
                    qkv, kv, self.head_dim, self.num_heads, self.num_kv_heads):  # and attention: one kernel
                out = layers.paged_decode_prep(
                    qkv, self.num_heads, self.num_kv_heads, positions, self.rotary_emb.cos_sin, kv, meta.slot_mapping,
                    meta.block_tables[:tokens], meta.context_lens[:tokens], self.q_norm.weight if norm else None,
                    self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0, meta.max_context_len)
                return self.o_proj(out.view(tokens, -1))
            q, k, v = layers.qkv_prep(qkv, self.num_heads, self.num_kv_heads, positions, self.rotary_emb.cos_sin,
                                      attn_metadata.kv_cache.kv[self.layer], attn_metadata.slot_mapping,
                                      self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                                      self.q_norm.eps if norm else 0.0)
            return self.o_proj(paged_attention(q, k, v, self.layer, attn_metadata, stored=True))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)  # (tokens, q_heads, d), views into qkv
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)  # (tokens, kv_heads, d)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3's QK-norm: each head's vector normalised before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        else:  # RoPE works in place on contiguous tensors
            q, k = q.contiguous(), k.contiguous()
        q, k = self.rotary_emb(positions, q, k)
        out = attention(q, k, v, self.layer, attn_metadata)  # (tokens, q_heads * d)
        return self.o_proj(out)


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up as one matmul."""

    def __init__(self, config: ModelConfig, *, device, dtype):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, device=device, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (tokens, 2I) -> SiLU·mul (tokens, I) -> down_proj (tokens, H)
        if type(self.down_proj) is Linear:  # the package's own layer (quantization, tensor parallelism swap others)
            return layers.silu_and_mul_linear(gate_up, self.down_proj.weight)  # batch 1 on a GPU: one kernel
        return self.down_proj(layers.silu_and_mul(gate_up))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary_emb: RotaryEmbedding, *, device, dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = Qwen3Attention(config, layer, rotary_emb, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = Qwen3MLP(config, device=device, dtype=dtype)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata | None) -> tuple[torch.Tensor, torch.Tensor]:
        side = layers.l2_prefetch_fork(hidden_states, self._prefetch)  # batch-1 graphs: weights into L2, aside
        if residual is None:  # first layer: the residual stream starts as the embeddings
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        layers.l2_prefetch_join(side)  # the branch only issues requests: joined at once, before attention's split
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def _prefetch(self) -> tuple[torch.Tensor, ...]:
        """The matrices read after qkv_proj (o_proj, gate_up_proj, down_proj), when all three are the package's
        own ``Linear`` (quantization and tensor parallelism swap in others): ``layers.l2_prefetch_fork``."""
        mods = (self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        return tuple(m.weight for m in mods) if all(type(m) is Linear for m in mods) else ()


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig, *, device, dtype):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(config, device=device)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i, self.rotary_emb, device=device, dtype=dtype)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None  # (tokens, H)
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Qwen3ForCausalLM(nn.Module):
    """The whole model: ``forward`` gives the final hidden states, ``compute_logits`` the next-token logits.

    Built with uninitialised weights on ``device`` in ``dtype`` (``device="meta"`` costs no memory, e.g.
    to count parameters); :meth:`load_weights` (or ``minivllm.model.load_model``) fills them.
    """

    def __init__(self, config: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, device=device, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else \
            Linear(config.hidden_size, config.vocab_size, device=device, dtype=dtype)
        self.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    block_decoder = None  # set by minivllm.model.quant.quantize_model("q4") on a CPU; see forward

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """input_ids, positions: (tokens,) -> hidden states (tokens, hidden_size).

        ``attn_metadata=None``: the tokens are one whole sequence and nothing is cached. A CPU model with 4-bit
        block weights (``quantize_model(model, "q4")``) hands the decode steps it accepts to its ``block_decoder``
        (:mod:`minivllm.model.q4_decode`: the same math in a few numba calls per layer).
        """
        decoder = self.block_decoder
        if decoder is not None and decoder.accepts(input_ids, attn_metadata):
            return decoder(input_ids, positions, attn_metadata)
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden_size) -> (tokens, vocab_size); pass only the rows you sample from."""
        if self.lm_head is not None:  # untied, or a packed fp16/int8 head (minivllm.model.quant; the lookup stays fp32)
            return self.lm_head(hidden_states)
        return F.linear(hidden_states, self.model.embed_tokens.weight)

    # ------------------------------------------------------------------------- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *,
                     mapping: Callable[[str], tuple[str, str | None]] = checkpoint_to_param) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the parameters: see :func:`weights.load_weights`."""
        load_weights(self, weights, mapping=mapping)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component, each counted once (a tied lm_head is the embedding)."""
        c = self.config
        counts = dict.fromkeys(("embedding", "q_proj", "k_proj + v_proj", "o_proj", "gate_proj + up_proj",
                                "down_proj", "RMSNorm weights", "lm_head"), 0)
        for name, p in self.named_parameters():
            if name.endswith("qkv_proj.weight"):  # split the fused matrix: GQA makes k and v small
                counts["q_proj"] += c.q_size * c.hidden_size
                counts["k_proj + v_proj"] += 2 * c.kv_size * c.hidden_size
                continue
            group = next(g for key, g in _GROUPS if key in name)
            counts[group] += p.numel()
        return {group: n for group, n in counts.items() if n}


_GROUPS = (("embed_tokens", "embedding"), ("o_proj", "o_proj"), ("gate_up_proj", "gate_proj + up_proj"),
           ("down_proj", "down_proj"), ("norm", "RMSNorm weights"), ("lm_head", "lm_head"))
