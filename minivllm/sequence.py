"""A request as the scheduler sees it: its tokens, its state, and the KV blocks it holds.

A :class:`Sequence` carries the prompt and the tokens generated so far, how many of them already have
their keys and values in the KV cache (``num_computed_tokens``), the block table that says where, and
the radix-cache node it locked at admission. Its ``status`` moves WAITING -> RUNNING -> FINISHED, with
RUNNING -> PREEMPTED -> RUNNING when the scheduler needs its memory back (its KV is recomputed).

Left out: sampling (the scheduler reads only the stopping fields of ``sampling_params``: ``max_tokens``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``), text and detokenization (stop strings are the output
side's), and several samples per prompt (``n > 1``: the engine makes one sequence per sample).
"""

import enum
import itertools
from dataclasses import dataclass, field
from minivllm.cache.radix import RadixNode
from minivllm.sampling_params import SamplingParams

_arrivals = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no blocks
    RUNNING = "running"  # holds blocks; computes prefill chunks or decodes
    PREEMPTED = "preempted"  # lost its blocks to memory pressure; waits to be recomputed
    FINISHED = "finished"  # done (see finish_reason); holds no blocks


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an EOS or stop token (or a stop string, reported by the detokenizer)
    LENGTH = "length"  # max_tokens reached, or the KV cache cannot hold the sequence any longer
    ABORT = "abort"  # the user aborted it


@dataclass(slots=True, eq=False)
class Sequence:
    """One request. ``token_ids`` is prompt + output; the first ``num_computed_tokens`` are in the KV cache."""

    seq_id: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival: int = field(default_factory=lambda: next(_arrivals))  # FCFS order: smaller arrived earlier
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id (or stop string) that finished it
    num_computed_tokens: int = 0  # tokens whose K and V are in the cache (block-table slots filled)
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)  # block i holds tokens i*bs .. (i+1)*bs - 1
    radix_node: RadixNode | None = None  # the locked end of the cached prefix (None: nothing locked)
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt is empty (it needs at least one token)")

    @property
    def token_ids(self) -> list[int]:
        """Prompt + output: a new list (O(length)); :meth:`tokens` reads a range without building it."""
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]``, copying only those tokens (a decode step reads one)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p: end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """More than the last token still needs computing (a prompt, or a recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table})")
