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
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

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
