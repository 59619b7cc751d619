"""``SamplingParams``: how one request turns logits into tokens, and when it stops (vLLM's names and meanings).

A frozen record, validated when it is made: a bad value raises ``ValueError`` naming the field and the
range it must lie in (a wrong type raises ``TypeError``), so a user's mistake surfaces at ``generate(...)``,
not deep inside a decode step. The sampler (:mod:`minivllm.sampler`) applies the knobs in vLLM's order::

    raw logits -> logprobs (if asked)     the log-probabilities reported are the model's own
               -> min_tokens              EOS and stop tokens masked until min_tokens are out
               -> penalties               repetition (prompt + output), frequency and presence (output)
               -> greedy? argmax          temperature 0
               -> / temperature -> min_p -> top_k -> top_p -> sample

``structured_outputs`` (a JSON schema, regex, choice or grammar: :mod:`minivllm.structured_output`) masks the
logits before all of this, so every token keeps the text inside the grammar.

Left out (vLLM has them): ``best_of``, beam search, ``logit_bias``, ``allowed_token_ids``, ``bad_words``,
``prompt_logprobs``, and the clamping of tiny temperatures.
"""

import dataclasses
import math
from dataclasses import dataclass

from minivllm.structured_output import StructuredOutputsParams

GREEDY_EPS = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)


def _number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    finite = math.isfinite(high)
    above = low < value if low_open else low <= value
    below = value <= high if finite else value < high  # also False for NaN
    if not (above and below):
        left, right = ("(" if low_open else "["), ("]" if finite else ")")
        raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value!r}")
    return float(value)


def _integer(name: str, value, low: int, what: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {what or f'>= {low}'}, got {value!r}")
    return value


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """Sampling and stopping for one request. Defaults are vLLM's (note ``max_tokens=16``)."""

    n: int = 1  # completions per prompt; the engine runs them as n requests (see for_child)
    temperature: float = 1.0  # >= 0; 0 = greedy (argmax)
    top_p: float = 1.0  # in (0, 1]: keep the most likely tokens whose mass first reaches top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # in [0, 1]: drop tokens less likely than min_p * the top token's probability; 0 = off
    presence_penalty: float = 0.0  # in [-2, 2]: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # in [-2, 2]: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0: tokens in prompt or output: positive logits / it, negative * it
    seed: int | None = None  # a request-own random stream: same seed, same tokens, whatever the batch
    max_tokens: int | None = 16  # >= 1; None: until the model's context is full
    min_tokens: int = 0  # EOS and stop_token_ids are masked (stop strings ignored) until this many tokens
    stop: tuple[str, ...] = ()  # stop strings (a str or a list is accepted); trimmed from the output
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request (kept in the output ids)
    ignore_eos: bool = False  # keep going after EOS (benchmarks)
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    skip_special_tokens: bool = True  # leave special tokens (<|im_end|>) out of the text
    logprobs: int | None = None  # return the top-`logprobs` log-probabilities (+ the sampled token's)
    structured_outputs: StructuredOutputsParams | None = None  # the output must match this grammar

    def __post_init__(self) -> None:
        _integer("n", self.n, 1)
        _number("temperature", self.temperature, 0, math.inf)
        _number("top_p", self.top_p, 0, 1, low_open=True)
        _integer("top_k", self.top_k, -1, "-1 or 0 (disabled) or >= 1")
        _number("min_p", self.min_p, 0, 1)
        _number("presence_penalty", self.presence_penalty, -2, 2)
        _number("frequency_penalty", self.frequency_penalty, -2, 2)
        _number("repetition_penalty", self.repetition_penalty, 0, math.inf, low_open=True)
        if self.seed is not None:
            _integer("seed", self.seed, -(2**63))
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1)
        _integer("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids or ())
        for t in ids:
            _integer("stop_token_ids", t, 0, "token ids >= 0")
        object.__setattr__(self, "stop_token_ids", ids)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be a StructuredOutputsParams, got "
                            f"{type(self.structured_outputs).__name__}")

    @property
    def greedy(self) -> bool:
        """Whether this request takes the argmax (temperature 0): top_k, top_p, min_p and seed are moot."""
        return self.temperature < GREEDY_EPS

    def for_child(self, index: int) -> "SamplingParams":
        """The params of completion ``index`` of ``n``: ``n=1``, and ``seed + index`` so children differ."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)
