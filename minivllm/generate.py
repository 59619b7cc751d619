"""The first generator: one prompt, greedy or temperature sampling, a contiguous KV cache.

The loop every LLM engine runs, in its simplest form::

    prefill:  the whole prompt in one forward pass -> K, V of every prompt token cached, logits of the last
    decode:   repeat { sample a token from the logits; feed just that token at the next position }

Each decode step costs one forward pass over a single token, because the keys and values of all earlier
tokens are read from the cache instead of recomputed. :func:`stream` yields token ids as they come,
:func:`generate` collects them with timings.

Left out, for later phases: batching several requests (phases 11-12), a paged cache (08), top-k/top-p
and the rest of the sampler (10), stop strings. This module runs one sequence at a time.
"""

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch

from minivllm.model import AttentionMetadata, KVCache, Qwen3ForCausalLM


@dataclass(slots=True)
class GenerationOutput:
    token_ids: list[int]  # the generated tokens (the EOS token that stopped it included)
    finish_reason: str  # "stop": an EOS token; "length": max_tokens reached
    prompt_tokens: int
    prefill_seconds: float = 0.0  # prompt forward pass, up to the first token
    decode_seconds: float = 0.0  # every later token
    step_seconds: list[float] = field(default_factory=list)  # one per decode step

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id from (vocab,) logits: argmax when ``temperature == 0``, else softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


@torch.inference_mode()
def stream(model: Qwen3ForCausalLM, prompt_ids: list[int], *, max_tokens: int = 256, temperature: float = 0.0,
           eos_token_ids: Collection[int] = (), seed: int | None = None,
           output: GenerationOutput | None = None) -> Iterator[int]:
    """Yield generated token ids one at a time, stopping after an EOS token or ``max_tokens`` tokens.

    ``output``, if given, is filled in as the tokens come (ids, finish reason, timings).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + max_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                         f"{limit} positions")
    out = output if output is not None else GenerationOutput([], "length", len(prompt_ids))
    out.prompt_tokens = len(prompt_ids)
    device = model.device
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache.allocate(model.config, len(prompt_ids) + max_tokens, device=device, dtype=model.dtype)
    eos = set(eos_token_ids)

    start = time.perf_counter()
    input_ids = torch.tensor(prompt_ids, device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    for step in range(max_tokens):
        context_len = len(prompt_ids) + step
        hidden = model(input_ids, positions, AttentionMetadata(cache, context_len))
        token = sample(model.compute_logits(hidden[-1:])[0], temperature, generator)
        token_id = int(token)  # NOTE: waits for the GPU: batch-1 decoding is sequential anyway
        now = time.perf_counter()
        if step == 0:
            out.prefill_seconds = now - start
        else:
            out.step_seconds.append(now - start)
            out.decode_seconds += now - start
        start = now
        out.token_ids.append(token_id)
        yield token_id
        if token_id in eos:
            out.finish_reason = "stop"
            return
        input_ids = token.reshape(1)
        positions = torch.tensor([context_len], device=device)
    out.finish_reason = "length"


def generate(model: Qwen3ForCausalLM, prompt_ids: list[int], **kwargs) -> GenerationOutput:
    """Run :func:`stream` to the end; the generated ids, why it stopped, and how long it took."""
    out = GenerationOutput([], "length", len(prompt_ids))
    for _ in stream(model, prompt_ids, output=out, **kwargs):
        pass
    return out
