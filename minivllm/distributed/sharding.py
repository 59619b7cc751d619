"""Tensor parallelism, Megatron style: how one model is cut into ``tp`` shards, and where the shards talk.

Every rank holds a slice of every big matrix and runs the whole layer stack on it; the slices are chosen so
that a layer needs the other ranks' work only at two points: after the attention's output projection and
after the MLP's down projection. One decoder layer on rank ``r`` of ``tp``::

    x (tokens, H), replicated ──► RMSNorm ──► qkv_proj[rows of r's heads] ──► attention over r's heads
        ──► o_proj[columns of r's heads] ──► partial (tokens, H) ──► ALL-REDUCE (sum) ──► + residual
        ──► RMSNorm ──► gate_up_proj[rows r] ──► SiLU(gate) · up ──► down_proj[columns r]
        ──► partial (tokens, H) ──► ALL-REDUCE (sum) ──► + residual

* **Column-parallel** ``qkv_proj`` and ``gate_up_proj``: a rank keeps the *output rows* of its heads (q, k and v
  of its KV heads and the query heads that share them) and of its slice of the intermediate width. Its input,
  the normalised hidden state, is the same on every rank, so nothing is exchanged: each rank's attention is
  ordinary GQA over its own heads, with its own slice of the KV cache (``kv_heads / tp`` heads per rank).
* **Row-parallel** ``o_proj`` and ``down_proj``: a rank keeps the *input columns* that match its heads (its
  intermediate slice), so ``o_proj(concat of all heads) = sum over ranks of o_proj_r(rank r's heads)``. Each
  rank computes its partial sum, and one all-reduce adds them: afterwards every rank holds the full result.
* **Vocab-parallel embedding**: rank ``r`` keeps rows ``[r * V/tp, (r+1) * V/tp)`` of the embedding. A token id
  outside its range looks up row 0 and is then zeroed; the all-reduce adds the one rank's row to zeros.
* **Vocab-parallel LM head**: the same rows (a tied head reuses them), so each rank computes the logits of its
  slice of the vocabulary; they are gathered to rank 0, which samples.
* RMSNorm weights, q/k-norm weights and the RoPE table are small and replicated.

What crosses between ranks per token (H = hidden_size, L = layers, V = vocab, b = bytes per value):

==============================  =================  ========================================================
collective                      how many per step  size per token
==============================  =================  ========================================================
embedding all-reduce            1                  H values (H * b bytes)
o_proj all-reduce               L                  H values
down_proj all-reduce            L                  H values
LM head gather to rank 0        1                  V / tp values from each rank, sampled rows only
==============================  =================  ========================================================

A ring all-reduce makes each rank send and receive ``2 (tp - 1) / tp`` times the tensor, so a token costs each
rank about ``(2L + 1) * H * b * 2 (tp - 1) / tp`` bytes: Qwen3-8B in bf16 (H = 4096, L = 36, tp = 2) 0.6 MB,
SmolLM2-135M in fp32 (H = 576, L = 30) 0.14 MB. Decode moves few tokens, so there each all-reduce is a latency,
paid 2L + 1 times a step: tens of microseconds over NVLink; 0.5-1 ms through gloo between two processes on the
course's busy 2-core CPU (load 2.5), which makes TP=2 slower than TP=1 there (bench/results/18_tensor_parallel_cpu_*).

**Uneven splits.** Heads are dealt out whole KV groups at a time: with ``kv`` KV heads each serving ``q / kv``
query heads, the first ``kv % tp`` ranks get one KV head more. So SmolLM2 (9 query heads, 3 KV heads) splits
over 2 ranks as 6 + 3 query heads and 2 + 1 KV heads. ``tp`` must not exceed the KV heads (a KV head is never
split or copied). The intermediate width is split the same way (differences of one column); the vocabulary into
equal shards of ``ceil(V / tp)`` rows, the last one padded with zero rows whose logits are dropped.

Each rank loads only its shard: the loaders read just :meth:`Shard.part` of every checkpoint tensor (safetensors'
lazy slices; a GGUF's quantized blocks of those rows and columns, dequantized alone), one tensor at a time, and
copy it into the parameter; no rank ever reads, dequantizes or holds the whole model.

Left out: sequence parallelism (the norms run replicated), splitting a KV head over ranks, pipeline parallelism.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch

from minivllm.model.config import ModelConfig
from minivllm.utils import cdiv


def check_tensor_parallel_size(config: ModelConfig, tp: int) -> None:
    """Raise a ``ValueError`` that says why, unless ``config`` can be split over ``tp`` ranks."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {tp!r}")
    if tp > config.num_key_value_heads:
        raise ValueError(f"tensor_parallel_size={tp} does not fit this model: each rank needs at least one of its "
                         f"{config.num_key_value_heads} KV heads (a KV head is not split); use at most "
                         f"{config.num_key_value_heads}")
    if tp > config.intermediate_size:
        raise ValueError(f"tensor_parallel_size={tp} exceeds the MLP width {config.intermediate_size}")


def split(n: int, parts: int, index: int) -> range:
    """Part ``index`` of ``range(n)`` cut into ``parts`` consecutive pieces; the first ``n % parts`` one longer."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


@dataclass(frozen=True, slots=True)
class Shard:
    """What rank ``rank`` of ``size`` holds: ranges of heads, intermediate columns and vocabulary rows."""

    rank: int
    size: int
    kv_heads: range  # its KV heads
    q_heads: range  # the query heads those KV heads serve
    intermediate: range  # its columns of the MLP's intermediate width
    vocab: range  # its token ids (embedding and LM head rows); may be shorter than vocab_rows
    vocab_rows: int  # rows of its embedding / LM head: ceil(V / size), the same on every rank
    head_dim: int

    @classmethod
    def of(cls, config: ModelConfig, rank: int, size: int) -> "Shard":
        check_tensor_parallel_size(config, size)
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in 0..{size - 1}")
        group = config.num_attention_heads // config.num_key_value_heads  # query heads per KV head
        kv = split(config.num_key_value_heads, size, rank)
        rows = cdiv(config.vocab_size, size)
        vocab = range(min(rank * rows, config.vocab_size), min((rank + 1) * rows, config.vocab_size))
        return cls(rank, size, kv, range(kv.start * group, kv.stop * group),
                   split(config.intermediate_size, size, rank), vocab, rows, config.head_dim)

    def model_config(self, config: ModelConfig) -> ModelConfig:
        """The config of the model this rank builds: its heads, its MLP width, its vocabulary rows."""
        return replace(config, num_attention_heads=len(self.q_heads), num_key_value_heads=len(self.kv_heads),
                       intermediate_size=len(self.intermediate), vocab_size=self.vocab_rows)

    def part(self, name: str) -> tuple[slice, slice] | None:
        """The (rows, columns) of checkpoint tensor ``name`` (a Hugging Face name) this rank keeps; None: all of it.
        The loaders read just that (``minivllm.model.loader.read_checkpoint(..., part=shard.part)``)."""
        d, q, kv, inter, every = self.head_dim, self.q_heads, self.kv_heads, self.intermediate, slice(None)
        if name.endswith(".q_proj.weight"):  # column-parallel: output rows
            return slice(q.start * d, q.stop * d), every
        if name.endswith((".k_proj.weight", ".v_proj.weight")):
            return slice(kv.start * d, kv.stop * d), every
        if name.endswith((".gate_proj.weight", ".up_proj.weight")):
            return slice(inter.start, inter.stop), every
        if name.endswith(".o_proj.weight"):  # row-parallel: input columns
            return every, slice(q.start * d, q.stop * d)
        if name.endswith(".down_proj.weight"):
            return every, slice(inter.start, inter.stop)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # vocab-parallel rows
            return slice(self.vocab.start, self.vocab.stop), every
        return None  # norms: replicated

    def fit(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``name`` as its parameter holds it: a vocab shard shorter than ``vocab_rows`` padded."""
        if name not in ("model.embed_tokens.weight", "lm_head.weight") or tensor.shape[0] == self.vocab_rows:
            return tensor
        padded = tensor.new_zeros((self.vocab_rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        return padded

    def slice_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole checkpoint tensor ``name``: a view where possible."""
        part = self.part(name)
        return self.fit(name, tensor[part] if part is not None else tensor)


def shard_weights(weights: Iterable[tuple[str, torch.Tensor]], shard: Shard, *,
                  sliced: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's (name, tensor) stream -> this rank's parts (see :meth:`Shard.part`). ``sliced``: the stream
    already holds the parts (read with ``part=shard.part``); only the vocab padding is left to add."""
    for name, tensor in weights:
        yield name, shard.fit(name, tensor) if sliced else shard.slice_tensor(name, tensor)
