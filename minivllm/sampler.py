"""The sampler: one step's logits ``(B, V)`` -> one token per row, every row with its own ``SamplingParams``.

    logits ─► logprobs (raw, if asked) ─► min_tokens mask ─► penalties ─┬─► argmax ──────────────► greedy rows
                                                                        └─► / temperature ─► min_p ─► top_k
                                                                            ─► top_p ─► inverse CDF ─► the others

The order is vLLM's; so is the meaning of every knob (:mod:`minivllm.sampling_params`). Build the batch with
:meth:`SamplingBatch.from_requests`; the ops are in :mod:`minivllm.sampling.filters`. Greedy rows are the exact
argmax of the penalized logits. A seeded request draws its one random number per step from its own
generator, so it gets the same tokens whatever else shares the batch, and on any device.

>>> batch = SamplingBatch.from_requests([SamplingParams(temperature=0), SamplingParams(top_p=0.9, seed=1)],
...                                     generators=[None, make_generator(1)])
>>> Sampler()(logits, batch).token_ids        # (2,)

Left out: logit bias, allowed/bad words, structured output, beam search, speculative decoding, and
CUDA kernels (the ops are torch's; the top-k/top-p path avoids a full sort, see the filters' docstring).
"""

from dataclasses import dataclass

import torch

from minivllm.sampling.batch import PenaltyBatch, SamplingBatch, make_generator
from minivllm.sampling.filters import (apply_min_p, apply_penalties, apply_top_k, apply_top_p, draw_uniforms,
                                      random_sample)
from minivllm.sampling_params import SamplingParams

__all__ = ["LogprobsTensors", "PenaltyBatch", "Sampler", "SamplerOutput", "SamplingBatch", "SamplingParams",
           "gather_logprobs", "make_generator"]


@dataclass(slots=True)
class LogprobsTensors:
    """vLLM's layout: column 0 is the sampled token, columns 1..K the K most likely (K: the batch's largest
    ``logprobs``; a row that asked for fewer reads its first ``1 + logprobs`` columns)."""

    token_ids: torch.Tensor  # (B, 1 + K) int64
    logprobs: torch.Tensor  # (B, 1 + K) float32: log-probabilities of the model's raw logits
    ranks: torch.Tensor  # (B,) int64: the sampled token's rank, 1 = the most likely


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # (B,) int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """The sampled token's log-probability and rank, and the ``k`` largest, of each row of ``logprobs``."""
    top_values, top_ids = logprobs.topk(k, dim=-1)
    sampled = logprobs.gather(1, token_ids.unsqueeze(1))  # (B, 1)
    ranks = (logprobs >= sampled).sum(-1)  # NOTE: a tie with a better token shares the worse rank, as in vLLM
    return LogprobsTensors(torch.cat([token_ids.unsqueeze(1), top_ids], 1), torch.cat([sampled, top_values], 1), ranks)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """(B,) int64: the argmax of each row of (B, V) ``logits``, the first index on ties and a NaN counted as the
    largest, as ``torch.argmax`` does. On a CPU through numpy's argmax: 5-8x faster than torch's on one thread
    here (a (256, 512) batch 40 against 230 µs, (8, 49,152) 76 against 590 µs); dtypes numpy lacks (bf16) stay
    with torch."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64, torch.float16):
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


class Sampler:
    """``Sampler()(logits, batch) -> SamplerOutput``.

    ``generator`` (a CPU ``torch.Generator``) draws for the rows without a seed; None: torch's global one.
    Each step is a method, so a subclass can replace one (notebook 10 plugs in the learner's filters).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size:
            raise ValueError(f"logits must be (batch, vocab) with batch {batch.batch_size}, got {tuple(logits.shape)}")
        if batch.all_greedy and batch.max_num_logprobs is None and batch.banned is None and batch.penalties is None:
            # nothing to change in the logits: the argmax of the model's own dtype (bf16 to fp32 is exact and keeps
            # the order), without the float32 copy -- at batch 192 on a GPU that copy and the argmax over it took
            # ~140 us a step (bench/results/h100/17_decode_profile_cuda_b192.json)
            return SamplerOutput(greedy_tokens(logits), None)
        # (B, V) float32; copied when the ban below writes in place, so the caller's tensor stays as it was
        logits = logits.to(torch.float32, copy=batch.banned is not None)
        raw = torch.log_softmax(logits, -1) if batch.max_num_logprobs is not None else None
        if batch.banned is not None:
            logits[batch.banned] = float("-inf")
        if batch.penalties is not None:
            logits = self.apply_penalties(logits, batch.penalties)
        token_ids = self.sample(logits, batch)
        logprobs = None if raw is None else gather_logprobs(raw, token_ids, batch.max_num_logprobs)
        return SamplerOutput(token_ids, logprobs)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Tokens (B,) from processed logits: argmax on greedy rows, a draw from the filtered distribution elsewhere."""
        greedy = None if batch.all_random else greedy_tokens(logits)
        if batch.all_greedy:
            return greedy
        logits = logits / batch.temperature.unsqueeze(1)
        if batch.min_p is not None:
            logits = self.apply_min_p(logits, batch.min_p)
        if batch.top_k is not None:
            logits = self.apply_top_k(logits, batch.top_k, batch.max_top_k)
        if batch.top_p is not None:
            logits = self.apply_top_p(logits, batch.top_p)
        weights = (logits - logits.amax(-1, keepdim=True)).exp()  # probabilities up to a factor per row
        u = draw_uniforms(batch.batch_size, batch.generators, self.generator, logits.device)
        sampled = random_sample(weights, u)
        return sampled if greedy is None else torch.where(batch.greedy, greedy, sampled)

    def apply_penalties(self, logits: torch.Tensor, p: PenaltyBatch) -> torch.Tensor:
        return apply_penalties(logits, p.prompt_token_ids, p.output_token_ids, p.presence, p.frequency, p.repetition)

    def apply_min_p(self, logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
        return apply_min_p(logits, min_p)

    def apply_top_k(self, logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
        return apply_top_k(logits, top_k, max_top_k)

    def apply_top_p(self, logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        return apply_top_p(logits, top_p)
