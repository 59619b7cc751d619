"""Read a GGUF file (llama.cpp's format) as a config and a stream of Hugging Face-named float tensors.

A GGUF file holds metadata (``llama.block_count``, ``tokenizer.ggml.tokens``, ...) and tensors named
the llama.cpp way (``blk.0.attn_q.weight``), most of them quantized in blocks (Q4_1: 32 weights share a
scale and a minimum). :func:`read_gguf` opens it with :class:`~minivllm.gguf_file.GGUFFile` (or takes one already open),
dequantizes one tensor at a time with the ``gguf`` package, renames it to the Hugging Face name
(:data:`GGUF_TO_HF`), and, for the Llama family, undoes the row permutation that llama.cpp's converter
applies to Q and K (:func:`unpermute_qk`).

Left out: running quantized matmuls (weights become float on load), architectures other than
``llama`` and ``qwen3``, and tensors llama.cpp adds for features we refuse (``rope_freqs``).
"""

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from minivllm.gguf_file import GGUFFile
from minivllm.model.config import ModelConfig, UnsupportedModelError

GGUF_TO_HF = {  # llama.cpp's name (after "blk.N.") -> Hugging Face's (after "model.layers.N.")
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PERMUTED_ARCHITECTURES = ("llama",)  # converters that permute Q/K rows for llama.cpp's rotary layout
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names unchanged."""
    if m := _BLOCK.match(name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{GGUF_TO_HF[part]}.{kind}" if part in GGUF_TO_HF else name
    base, _, kind = name.rpartition(".")
    return f"{GLOBAL_NAMES[base]}.{kind}" if base in GLOBAL_NAMES else name


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: (n_heads * d, hidden) rows back to Hugging Face's order.

    The converter reorders each head's d rows from two halves ``[x0..x(d/2-1) | y0..y(d/2-1)]`` (the
    half-split RoPE pairs) to interleaved pairs ``[x0 y0 x1 y1 ...]`` (GPT-J-style RoPE in llama.cpp).
    """
    rows = weight.shape[0]
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # (heads, d/2, 2, ...)
            .transpose(1, 2).reshape(weight.shape))  # (heads, 2, d/2, ...): halves again


def read_gguf(path: str | Path | GGUFFile) -> tuple[ModelConfig, int, Iterator[tuple[str, torch.Tensor]]]:
    """A GGUF path or open file: its config, its number of tensors, and an iterator of (HF name, float32 tensor)."""
    import gguf

    file = path if isinstance(path, GGUFFile) else GGUFFile(path)  # memory-mapped: read when dequantized
    if "token_embd.weight" not in file.tensors:
        raise UnsupportedModelError(f"{file.path}: no token_embd.weight tensor; is this a language model?")
    config = ModelConfig.from_gguf(file.metadata, tied="output.weight" not in file.tensors,
                                   vocab_size=file.tensors["token_embd.weight"].shape[0])

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, info in file.tensors.items():
            kind = gguf.GGMLQuantizationType(info.type)
            try:
                array = gguf.quants.dequantize(file.raw(name), kind)  # (rows, columns) float32
            except NotImplementedError as e:
                raise UnsupportedModelError(f"tensor {name} is stored as {kind.name}, which the gguf package "
                                            f"cannot dequantize ({e})") from None
            with warnings.catch_warnings():  # F32 tensors are read-only views of the file: we only read them
                warnings.simplefilter("ignore", UserWarning)
                weight = torch.from_numpy(np.asarray(array, dtype=np.float32).reshape(info.shape))
            if config.architecture in PERMUTED_ARCHITECTURES and name.endswith((".attn_q.weight", ".attn_k.weight")):
                heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
                weight = unpermute_qk(weight, heads)
            yield hf_name(name), weight

    return config, len(file.tensors), tensors()
