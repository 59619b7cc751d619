"""The record a step is planned in: what the scheduler hands the model runner (and the engine).

A neutral module: the scheduler builds a :class:`SchedulerOutput`, the runner turns it into tensors,
the output processor reads which rows were sampled. None of them imports another for it.

Rows of the flattened arrays follow ``scheduled``: decodes first (one token each), then prefill chunks. The
arrays are Python lists, or numpy arrays in a steady decode step (the scheduler's fast path, ``decode_batch``).
Block tables are the sequences' live tables, not copies: read them before the next ``schedule()``. While a
sequence runs its table only grows in place (blocks appended); released and admitted again, it gets a new
list. The runner's persistent block-table rows (``minivllm.runner.BlockTableRows``) rely on both.
"""

from dataclasses import dataclass, field

import numpy as np

from minivllm.sequence import Sequence


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step: 1 for a decode, the chunk length for a prefill
    start: int  # position of the first of them (the sequence's num_computed_tokens before the step)
    is_prefill: bool
    needs_sample: bool  # the step computes the last known token: its logits give the next token


@dataclass(slots=True)
class SchedulerOutput:
    """One step's work: who computes which tokens, and where their keys and values go."""

    step: int
    scheduled: list[ScheduledSequence]
    input_ids: list[int] = field(default_factory=list)  # (num_batched_tokens,)
    positions: list[int] = field(default_factory=list)  # (num_batched_tokens,)
    slot_mapping: list[int] = field(default_factory=list)  # (num_batched_tokens,) block * block_size + offset
    cu_seqlens_q: list[int] = field(default_factory=lambda: [0])  # (num_seqs + 1,) row starts in the flat arrays
    seq_lens: list[int] = field(default_factory=list)  # (num_seqs,) context length after the step
    block_tables: list[list[int]] = field(default_factory=list)  # (num_seqs, blocks) live tables
    sample_indices: list[int] = field(default_factory=list)  # flat rows whose logits are sampled
    preempted: list[int] = field(default_factory=list)  # seq ids preempted while scheduling this step
    finished: list[int] = field(default_factory=list)  # seq ids finished ("length"): the cache cannot hold them
    ended: list[Sequence] = field(default_factory=list)  # filled by Scheduler.postprocess: the sequences it ended
    dropped: int = 0  # filled by Scheduler.postprocess: sampled rows whose sequence had already ended (not appended)
    decode_batch: int | None = None  # a steady decode step (Scheduler's fast path): its batch's id, else None
    pending_inputs: np.ndarray | None = None  # planned ahead: row i's input is the previous step's sampled row
    #   pending_inputs[i], not known when planned (input_ids holds -1 there; Scheduler.schedule_ahead)
    _num_decodes: int | None = None  # counted once (the runner, the sampler and the step log all ask)

    @property
    def num_batched_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_decodes(self) -> int:
        if self._num_decodes is None:
            self._num_decodes = sum(1 for s in self.scheduled if not s.is_prefill)
        return self._num_decodes

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes  # a decode computes one token

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_batched_tokens - self.num_decodes

    @property
    def sampled_seqs(self) -> list[Sequence]:
        return [s.seq for s in self.scheduled if s.needs_sample]
