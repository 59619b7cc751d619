"""What the engine hands back: vLLM-shaped ``RequestOutput`` records, and the per-step log.

A request's ``RequestOutput`` carries one ``CompletionOutput`` per sample (``n``). ``text`` is everything
safe to show so far (a possible stop-string beginning is held back until it is resolved), ``delta_text``
what became safe since the previous output of that request (what a stream sends).
"""

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]  # all output tokens so far (a copy)
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} (sampled + top-k)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (largest over the samples)
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass(slots=True)
class StepRecord:
    """One engine step, for timelines (notebooks 11-12) and metrics."""

    step: int
    start: float  # time.monotonic()
    end: float
    num_decode_tokens: int
    num_prefill_tokens: int
    num_cached_prefill_tokens: int  # prompt tokens admitted from the prefix cache this step
    seqs: list[tuple[int, int, bool]]  # (seq id, tokens computed, is_prefill)
    preempted: list[int]
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    graph: bool  # replayed a captured CUDA graph


@dataclass(slots=True, frozen=True)
class EngineSnapshot:
    """A public view of the engine's state after a step (``LLMEngine.snapshot()``): what ``/metrics`` reads."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0  # not free: held by sequences or by the radix cache
    kv_blocks_cached: int = 0  # held only by the radix cache (evictable)
    num_kv_blocks: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cache_hit_rate: float = 0.0  # prompt tokens served by the radix cache / prompt tokens looked up
    steps: int = 0
    num_preemptions: int = 0
    requests_finished: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by running sequences (cached-only blocks are free to reuse), 0..1."""
        return (self.kv_blocks_used - self.kv_blocks_cached) / self.num_kv_blocks if self.num_kv_blocks else 0.0
