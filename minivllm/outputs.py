"""What the engine hands back: vLLM-shaped ``RequestOutput`` records, and the per-step log.

A request's ``RequestOutput`` carries one ``CompletionOutput`` per sample (``n``). ``text`` is everything
safe to show so far (a possible stop-string beginning is held back until it is resolved), ``delta_text``
what became safe since the previous output of that request (what a stream sends).
"""

import time
from dataclasses import dataclass, field


class CompletionOutput:
    """One sample's output at one step. ``token_ids`` (all output tokens so far) and ``logprobs`` are read lazily
    from the sequence's own lists, up to their lengths at this step: those lists only grow, so the values are the
    step's, and a stream that reads only the deltas copies nothing of a long answer at each step (the engine's
    host time per step stays flat as answers grow). Each read of ``token_ids`` returns a new list."""

    __slots__ = ("index", "text", "finish_reason", "stop_reason", "delta_text", "delta_token_ids", "_ids", "_n",
                 "_logprobs", "_n_logprobs")

    def __init__(self, index: int, text: str, token_ids: list[int], finish_reason: str | None = None,
                 stop_reason: int | str | None = None, logprobs: list[dict[int, float]] | None = None,
                 delta_text: str = "", delta_token_ids: list[int] | None = None):
        self.index = index  # which of the request's n samples
        self.text = text
        self.finish_reason = finish_reason  # "stop", "length", "abort"; None while running
        self.stop_reason = stop_reason  # the stop string or stop token id that ended it
        self.delta_text = delta_text
        self.delta_token_ids = [] if delta_token_ids is None else delta_token_ids
        self._ids, self._n = token_ids, len(token_ids)  # the live list, and how much of it is this step's
        self._logprobs = logprobs  # per token: {token id: logprob} (sampled + top-k)
        self._n_logprobs = 0 if logprobs is None else len(logprobs)

    @property
    def token_ids(self) -> list[int]:
        """All output tokens up to this step (a copy)."""
        return self._ids[: self._n]

    @property
    def num_tokens(self) -> int:
        """``len(token_ids)``, without the copy."""
        return self._n

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return None if self._logprobs is None else self._logprobs[: self._n_logprobs]

    def since(self, first: int) -> tuple[list[int], list[dict[int, float]]]:
        """Token ids and logprobs (empty without them) from output position ``first`` to this step."""
        logprobs = [] if self._logprobs is None else self._logprobs[first: self._n_logprobs]
        return self._ids[first: self._n], logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _COMPARED)

    def __repr__(self) -> str:
        return "CompletionOutput(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in _COMPARED) + ")"


_COMPARED = ("index", "text", "token_ids", "finish_reason", "stop_reason", "logprobs", "delta_text", "delta_token_ids")


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
        return sum(o.num_tokens for o in self.outputs)


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
