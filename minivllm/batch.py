"""The record a step is planned in: what the scheduler hands the model runner (and the engine).

A neutral module: the scheduler builds a :class:`SchedulerOutput`, the runner turns it into tensors,
the output processor reads which rows were sampled. None of them imports another for it.

Rows of the flattened arrays follow ``scheduled``: decodes first (one token each), then prefill chunks.
Block tables are the sequences' live tables, not copies: read them before the next ``schedule()``. While a
sequence runs its table only grows in place (blocks appended); released and admitted again, it gets a new
list. The runner's persistent block-table rows (``minivllm.runner.BlockTableRows``) rely on both.
"""

from dataclasses import dataclass, field

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

    @property
    def num_batched_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_decodes(self) -> int:
        return sum(1 for s in self.scheduled if not s.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if not s.is_prefill)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if s.is_prefill)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        return [s.seq for s in self.scheduled if s.needs_sample]
