"""Checkpoint tensors -> the model's parameters: names, fused shards, and the checks on the way.

A Hugging Face checkpoint stores ``q_proj``, ``k_proj``, ``v_proj`` and ``gate_proj``, ``up_proj`` as
separate matrices; the model keeps them stacked as rows of ``qkv_proj`` and ``gate_up_proj`` (one matmul
each). :func:`checkpoint_to_param` says where a checkpoint tensor goes, :func:`shard_rows` which rows it
fills, and :func:`load_weights` copies every tensor into place, converting dtype and device as it goes,
so that no second copy of the model is ever made. Any mismatch raises :class:`WeightLoadError` naming
the tensor and the shapes. Left out: quantized parameters. Tensor-parallel slicing is ``minivllm.distributed.sharding``'s.
"""

from collections.abc import Callable, Iterable

import torch
from torch import nn

from minivllm.model.config import ModelConfig

# checkpoint projection -> (our fused parameter, shard): vLLM's "stacked params mapping"
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; we compute them


class WeightLoadError(ValueError):
    """A checkpoint's tensors do not fit the model: a missing, unexpected or mis-shaped tensor."""


def checkpoint_to_param(name: str) -> tuple[str, str | None]:
    """A Hugging Face checkpoint tensor's name -> (our parameter's name, shard or None for all of it).

    >>> checkpoint_to_param("model.layers.0.self_attn.k_proj.weight")
    ('model.layers.0.self_attn.qkv_proj.weight', 'k')
    """
    for theirs, (ours, shard) in STACKED_PARAMS.items():
        if f".{theirs}." in name:
            return name.replace(f".{theirs}.", f".{ours}."), shard
    return name, None


def shard_rows(config: ModelConfig, shard: str) -> slice:
    """The rows of a fused parameter that one checkpoint tensor fills (e.g. k_proj's inside qkv_proj)."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    rows = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
            "gate": slice(0, inter), "up": slice(inter, 2 * inter)}
    if shard not in rows:
        raise WeightLoadError(f"unknown shard {shard!r}; shards: {', '.join(rows)}")
    return rows[shard]


def expected_weights(model: nn.Module, config: ModelConfig) -> dict[tuple[str, str | None], tuple[int, ...]]:
    """Every (parameter, shard) a checkpoint must provide for ``model``, with its shape."""
    expected = {}
    for name, param in model.named_parameters():
        fused = next((ours for ours, _ in STACKED_PARAMS.values() if f".{ours}." in name), None)
        for shard in [s for ours, s in STACKED_PARAMS.values() if ours == fused] if fused else [None]:
            rows = param.shape[0] if shard is None else len(range(param.shape[0])[shard_rows(config, shard)])
            expected[(name, shard)] = (rows, *param.shape[1:])
    return expected


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], *,
                 mapping: Callable[[str], tuple[str, str | None]] = checkpoint_to_param,
                 config: ModelConfig | None = None) -> None:
    """Copy (name, tensor) pairs with Hugging Face names into ``model``'s parameters (``model.config``).

    A tied model (``config.tie_word_embeddings``) skips ``lm_head.weight``: the embedding is its lm_head.
    ``config``: the sizes the parameters were built with, when not ``model.config`` (a tensor-parallel shard's).
    """
    config = config or model.config
    params = dict(model.named_parameters())
    expected, loaded = expected_weights(model, config), set()
    for name, tensor in weights:
        if name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        target_name, shard = mapping(name)
        if (target_name, shard) not in expected:
            raise WeightLoadError(f"unexpected checkpoint tensor {name} {tuple(tensor.shape)}: the model has no "
                                  f"parameter {target_name}" + (f" (shard {shard!r})" if shard else ""))
        target = params[target_name].data
        if shard is not None:
            target = target[shard_rows(config, shard)]
        if tuple(tensor.shape) != tuple(target.shape):
            where = target_name + (f"[{shard}]" if shard else "")
            raise WeightLoadError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"but {where} expects {tuple(target.shape)}")
        target.copy_(tensor)  # converts dtype and device: the only copy
        loaded.add((target_name, shard))
    missing = [f"{n}{f'[{s}]' if s else ''} {shape}" for (n, s), shape in expected.items() if (n, s) not in loaded]
    if missing:
        raise WeightLoadError(f"the checkpoint lacks {len(missing)} tensor(s): " + ", ".join(missing[:8])
                              + (", ..." if len(missing) > 8 else ""))
