"""The sharded model: :class:`TensorParallelQwen3ForCausalLM`, one rank's slice of Qwen3 / Llama.

It is the ordinary :class:`~minivllm.model.qwen3.Qwen3ForCausalLM` built with this rank's sizes (its heads, its
MLP width, its vocabulary rows: :meth:`Shard.model_config`), so attention, RoPE, the norms and the column-parallel
``qkv_proj`` / ``gate_up_proj`` run unchanged; three kinds of module are swapped in where the ranks must talk:

* :class:`RowParallel` around ``o_proj`` and ``down_proj``: the local matmul, then an all-reduce (sum);
* :class:`VocabParallelEmbedding` for ``embed_tokens``: a masked lookup of this rank's rows, then an all-reduce;
* :meth:`TensorParallelQwen3ForCausalLM.compute_logits`: this rank's slice of the logits, gathered to rank 0.

``RowParallel`` *contains* its ``Linear`` (as ``.linear``), so :func:`minivllm.model.quant.quantize_model` swaps the
inner layer for an fp16 one and the all-reduce stays: on a CPU each rank quantizes its own shard. A tied LM head
is built from the rank's embedding rows, so it is vocab-parallel too. With ``tensor_parallel_size=1`` none of this
is used: the engine builds the plain model.

:func:`load_shard` builds a rank's model and reads only its slices of the checkpoint; :func:`shard_num_kv_blocks`
says how many KV blocks of its heads fit beside it.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from minivllm.config import EngineConfig
from minivllm.distributed.group import TensorParallelGroup
from minivllm.distributed.sharding import Shard, shard_weights
from minivllm.model.config import ModelConfig
from minivllm.model.qwen3 import Qwen3ForCausalLM
from minivllm.model.weights import checkpoint_to_param, load_weights

ROW_PARALLEL = ("o_proj", "down_proj")


class RowParallel(nn.Module):
    """A linear layer whose input columns are split over the ranks: local partial sums, then one all-reduce."""

    def __init__(self, linear: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.linear(x))  # (tokens, in / tp) -> (tokens, out), summed over ranks


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding (token ids ``vocab``); other ids give zeros, and the all-reduce adds them."""

    def __init__(self, weight: nn.Parameter, vocab: range, group: TensorParallelGroup) -> None:
        super().__init__()
        self.weight, self.start, self.num_ids, self.group = weight, vocab.start, len(vocab), group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start  # (tokens,)
        outside = (local < 0) | (local >= self.num_ids)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)  # (tokens, H)
        hidden.masked_fill_(outside[:, None], 0.0)
        return self.group.all_reduce(hidden)


class TensorParallelQwen3ForCausalLM(Qwen3ForCausalLM):
    """Rank ``group.rank``'s shard. ``config`` is the whole model's (vocab size, layers); ``shard_config`` this rank's
    (its heads: ``shard_config.kv_shape`` is what its KV cache holds)."""

    def __init__(self, config: ModelConfig, group: TensorParallelGroup, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shard = Shard.of(config, group.rank, group.size)
        super().__init__(shard.model_config(config), device=device, dtype=dtype)
        self.shard, self.shard_config, self.config, self.group = shard, self.config, config, group
        for layer in self.model.layers:
            layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
            layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
        self.model.embed_tokens = VocabParallelEmbedding(self.model.embed_tokens.weight, shard.vocab, group)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata=None) -> torch.Tensor:
        """Always the modules, whose row-parallel projections and embedding hold the collectives: never a fused
        single-device path (the q4 ``block_decoder`` of ``minivllm.model.quant``, which knows nothing of ranks)."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Rank 0: (tokens, vocab_size), every rank's slice gathered. Other ranks: their own slice (unused)."""
        local = super().compute_logits(hidden_states)  # (tokens, ceil(V / tp))
        logits = self.group.gather(local)
        if logits is None:
            return local
        vocab = self.config.vocab_size
        return logits if logits.shape[-1] == vocab else logits[:, :vocab].contiguous()  # padding rows dropped

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], *,
                     mapping: Callable[[str], tuple[str, str | None]] = checkpoint_to_param,
                     sliced: bool = False) -> None:
        """The checkpoint's tensors in: whole ones (each sliced to this rank's part as it streams by), or with
        ``sliced`` only this rank's parts (``read_checkpoint(..., part=self.shard.part)``)."""
        def row_parallel(name: str) -> tuple[str, str | None]:
            target, part = mapping(name)
            for proj in ROW_PARALLEL:
                target = target.replace(f".{proj}.weight", f".{proj}.linear.weight")
            return target, part

        load_weights(self, shard_weights(weights, self.shard, sliced=sliced), mapping=row_parallel,
                     config=self.shard_config)

    def parameter_counts(self) -> dict[str, int]:
        raise NotImplementedError("parameter_counts describes the whole model: build it with tensor_parallel_size=1")


def load_shard(config: EngineConfig, group: TensorParallelGroup, *, tokenizer: bool):
    """This rank's :class:`TensorParallelQwen3ForCausalLM` with its weights, quantized as ``config`` says, and (when
    ``tokenizer``) the checkpoint's tokenizer. A ``ModelConfig`` gives random weights (seed + rank) and no tokenizer."""
    from minivllm.gguf_file import GGUFFile
    from minivllm.model import ModelConfig, resolve_model_path
    from minivllm.model.loader import read_checkpoint
    from minivllm.model.quant import quantize_model
    from minivllm.tokenizer import Tokenizer

    device, dtype, tok = group.device, config.torch_dtype, None
    if isinstance(config.model, ModelConfig):
        model = TensorParallelQwen3ForCausalLM(config.model, group, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(config.seed + group.rank)
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    else:
        path = resolve_model_path(config.model)
        source = path if path.is_dir() else GGUFFile(path)  # one parse of a GGUF for weights and tokenizer
        model_config = read_checkpoint(source)[0]
        model = TensorParallelQwen3ForCausalLM(model_config, group, device=device, dtype=dtype)
        model.load_weights(read_checkpoint(source, part=model.shard.part)[2], sliced=True)  # only its slices read
        if tokenizer and path.is_dir():
            tok = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
        elif tokenizer:
            tok = Tokenizer.from_gguf(source)
    quantize_model(model.eval(), config.quantization_method)  # NOTE: each rank quantizes its own shard
    return model, tok


def shard_num_kv_blocks(config: EngineConfig, model: TensorParallelQwen3ForCausalLM, max_model_len: int) -> int:
    """How many KV blocks fit on this rank (``minivllm.components.num_kv_blocks`` for a shard's KV heads). On a GPU
    the profiling forward pass meets the other ranks at its all-reduces: every rank runs it at the same time."""
    from minivllm.cache import blocks_for_budget, gpu_kv_budget

    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    device, dtype = model.device, config.torch_kv_cache_dtype
    if device.type == "cuda":
        tokens = min(config.scheduler_config.max_num_batched_tokens, max_model_len)

        def profile():
            hidden = model(torch.zeros(tokens, dtype=torch.long, device=device), torch.arange(tokens, device=device))
            model.compute_logits(hidden[: config.max_num_seqs])

        budget = gpu_kv_budget(device, config.gpu_memory_utilization, profile)
    else:
        budget = config.kv_cache_memory
    return blocks_for_budget(model.shard_config.kv_shape, budget, dtype, config.block_size)
