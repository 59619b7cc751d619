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
from collections.abc import Callable, Iterator
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


Part = Callable[[str], tuple[slice, slice] | None]  # HF name -> (rows, columns) to read; None: all of it


def _raw_part(raw: np.ndarray, kind, columns: int, part: tuple[slice, slice]) -> tuple[np.ndarray, slice]:
    """The bytes of ``raw`` (rows, bytes per row) that hold ``part``: its rows, and its columns when they start and
    end on whole quantization blocks (the columns left to cut after dequantizing, else ``slice(None)``)."""
    import gguf

    rows, cols = part
    raw = raw[rows]
    start, stop, _ = cols.indices(columns)
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    if start % block or (stop % block and stop != columns):
        return raw, cols  # NOTE: a column range inside a block: dequantize whole rows, then cut
    return raw[:, start // block * nbytes: -(-stop // block) * nbytes], slice(None)


def dequantize(raw: np.ndarray, kind) -> np.ndarray:
    """``raw`` (rows, bytes per row) as float32 (rows, columns). Q4_1 and Q8_0 (every 2-D tensor of the embedded
    default model) are done here in vectorized PyTorch, ~3x faster than the gguf package's numpy, with the same
    float32 arithmetic (so the same bits: ``tests/test_06_loader.py`` checks it against ``gguf.quants``); every
    other type goes to ``gguf.quants.dequantize``.

    Q8_0: blocks of 32 values, ``d`` (fp16) then 32 int8 ``q``: ``d * q``. Q4_1: blocks of 32, ``d`` and ``m``
    (fp16), then 16 bytes whose low nibbles are values 0-15 and high nibbles 16-31: ``d * q + m``."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if kind not in (Q.Q4_1, Q.Q8_0) or raw.ndim != 2:
        return gguf.quants.dequantize(raw, kind)
    nbytes = gguf.GGML_QUANT_SIZES[kind][1]
    with warnings.catch_warnings():  # a read-only view of the memory-mapped file: only read
        warnings.simplefilter("ignore", UserWarning)
        blocks = torch.from_numpy(np.ascontiguousarray(raw)).view(-1, nbytes)
    d = blocks[:, 0:2].view(torch.float16).float()
    if kind == Q.Q8_0:
        values = d * blocks[:, 2:].view(torch.int8).float()
    else:
        qs = blocks[:, 4:].contiguous()  # (bitwise ops on the strided view take ~100x longer)
        values = d * torch.cat([qs & 0x0F, qs >> 4], dim=1).float() + blocks[:, 2:4].view(torch.float16).float()
    return values.view(raw.shape[0], -1).numpy()


def read_gguf(path: str | Path | GGUFFile,
              part: Part | None = None) -> tuple[ModelConfig, int, Iterator[tuple[str, torch.Tensor]]]:
    """A GGUF path or open file: its config, its number of tensors, and an iterator of (HF name, float32 tensor).

    ``part``: for each 2-D tensor, the rows and columns to read (a tensor-parallel rank's slice); only those are
    dequantized (whole blocks), so a rank never dequantizes the rest."""
    import gguf

    file = path if isinstance(path, GGUFFile) else GGUFFile(path)  # memory-mapped: read when dequantized
    if "token_embd.weight" not in file.tensors:
        raise UnsupportedModelError(f"{file.path}: no token_embd.weight tensor; is this a language model?")
    config = ModelConfig.from_gguf(file.metadata, tied="output.weight" not in file.tensors,
                                   vocab_size=file.tensors["token_embd.weight"].shape[0])

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, info in file.tensors.items():
            kind = gguf.GGMLQuantizationType(info.type)
            raw, shape, cut = file.raw(name), info.shape, None
            wanted = part(hf_name(name)) if part is not None and len(shape) == 2 else None
            if wanted is not None:
                raw, cut = _raw_part(raw, kind, shape[-1], wanted)
                shape = (raw.shape[0], -1)
            try:
                array = dequantize(raw, kind)  # (rows, columns) float32
            except NotImplementedError as e:
                raise UnsupportedModelError(f"tensor {name} is stored as {kind.name}, which the gguf package "
                                            f"cannot dequantize ({e})") from None
            with warnings.catch_warnings():  # F32 tensors are read-only views of the file: we only read them
                warnings.simplefilter("ignore", UserWarning)
                weight = torch.from_numpy(np.asarray(array, dtype=np.float32).reshape(shape))
            if cut is not None:
                weight = weight[:, cut]
            if config.architecture in PERMUTED_ARCHITECTURES and name.endswith((".attn_q.weight", ".attn_k.weight")):
                weight = unpermute_qk(weight, weight.shape[0] // config.head_dim)  # whole heads, even in a part
            yield hf_name(name), weight

    return config, len(file.tensors), tensors()
