"""The model's shape: a frozen, validated :class:`ModelConfig`, read from ``config.json`` or GGUF metadata.

Two families share one model class: **Qwen3** (``qk_norm=True``: RMSNorm over ``head_dim`` on q and k
before RoPE) and **Llama** (SmolLM2 among them: no QK-norm). Everything else the engine needs about a
checkpoint is here; everything the engine does not support (attention or MLP biases, RoPE scaling for
long contexts, sliding windows, activations other than SiLU) is refused with a message that says so,
instead of producing a model that silently computes something else.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from minivllm.cache.kv_cache import KVShape

ARCHITECTURES = {"qwen3": True, "llama": False}  # model_type -> whether it has QK-norm


class UnsupportedModelError(ValueError):
    """The checkpoint asks for an architecture or a feature this engine does not implement."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # "qwen3" or "llama": the checkpoint's model_type
    vocab_size: int  # rows of the embedding and of lm_head
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the MLP's gate and up projections
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # key/value heads (GQA: each serves num_attention_heads / this many queries)
    head_dim: int  # width of one head (Qwen3: not always hidden_size / heads)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # RoPE base: inv_freq[i] = theta ** (-2i / head_dim)
    max_position_embeddings: int = 4096  # rows of the RoPE table: the longest sequence
    tie_word_embeddings: bool = False  # lm_head reuses the embedding matrix
    qk_norm: bool = False  # RMSNorm on each q and k head before RoPE (Qwen3)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"rms_norm_eps and rope_theta must be positive, "
                             f"got {self.rms_norm_eps}, {self.rope_theta}")

    @property
    def q_size(self) -> int:
        """Width of q: all query heads side by side."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_shape(self) -> KVShape:
        """What the paged KV cache needs to know of the model."""
        return KVShape(self.num_hidden_layers, self.num_key_value_heads, self.head_dim)

    @property
    def kv_size(self) -> int:
        """Width of k (and of v)."""
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """From a Hugging Face ``config.json`` (transformers 4.x ``rope_theta`` or 5.x ``rope_parameters``)."""
        arch = config.get("model_type")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported architecture {arch!r} (config.json model_type, "
                                        f"architectures={config.get('architectures')}); supported: "
                                        f"{', '.join(ARCHITECTURES)}")
        _refuse(config.get("hidden_act", "silu") != "silu", f"hidden_act {config.get('hidden_act')!r} (only silu)")
        _refuse(bool(config.get("attention_bias")), "attention_bias=true")
        _refuse(bool(config.get("mlp_bias")), "mlp_bias=true")
        _refuse(bool(config.get("use_sliding_window")), "use_sliding_window=true")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _refuse(rope_type != "default", f"RoPE scaling {rope_type!r} (only the default RoPE)")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=ARCHITECTURES[arch],
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], *, tied: bool, vocab_size: int | None = None) -> "ModelConfig":
        """From GGUF metadata (``general.architecture``, ``<arch>.block_count``, ...).

        ``tied``: whether the file lacks ``output.weight`` (llama.cpp then reuses ``token_embd``);
        ``vocab_size``: the embedding's rows, when the metadata does not say.
        """
        arch = metadata.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"unsupported GGUF architecture {arch!r}; "
                                        f"supported: {', '.join(ARCHITECTURES)}")

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
        _refuse(scaling not in ("none", "linear") or float(metadata.get(f"{arch}.rope.scaling.factor", 1.0)) != 1.0,
                f"RoPE scaling {scaling!r}")
        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        return cls(
            architecture=arch,
            vocab_size=int(metadata.get(f"{arch}.vocab_size") or vocab_size or get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(get("attention.key_length", hidden // heads)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=tied,
            qk_norm=ARCHITECTURES[arch],
        )


def _refuse(condition: bool, what: str) -> None:
    if condition:
        raise UnsupportedModelError(f"this checkpoint uses {what}, which minivllm does not implement")
