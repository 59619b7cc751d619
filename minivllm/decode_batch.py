"""A steady decode batch as arrays: how the scheduler plans decode steps without a Python loop per sequence.

Most steps of a busy engine are *steady*: every running sequence decodes one token and nobody can be admitted.
Then the next plan is the last one with every position + 1, and every KV slot + 1 as well (a sequence's
consecutive positions sit in consecutive slots of one block), except for the sequences that cross into a new
block -- 1 in ``block_size`` of them per step -- which need a block allocated first. :class:`DecodeBatch` keeps the
batch's positions and slots as numpy arrays from step to step (:func:`next_decode_positions`), with what the
stop rules need (prompt lengths, ``max_tokens``, who has stop tokens), so ``Scheduler.postprocess`` can test them
on arrays and run :func:`~minivllm.stop.check_stop` only on the rows that may stop.

The :class:`~minivllm.scheduler.Scheduler` builds a batch from a full plan whose rows all decode, advances it
while nothing changes, drops the rows of sequences that finished (:meth:`DecodeBatch.keep`, a new batch id), and
goes back to its full :meth:`~minivllm.scheduler.Scheduler.plan` for anything else (an admission, a preemption,
a prefill). At batch 256 this is ~0.2 ms of host work per step where the full plan took ~1.2 ms.

Left out: sequences joining a batch in place (a new batch is built instead).
"""

import itertools
from dataclasses import dataclass

import numpy as np

from minivllm.batch import SchedulerOutput
from minivllm.sequence import Sequence

_batch_ids = itertools.count()


def next_decode_positions(positions: np.ndarray, slots: np.ndarray, block_size: int):
    """A steady decode batch's next step from the one just planned: every position and every KV slot one further
    (a sequence's consecutive positions sit in consecutive slots of a block), except that a row whose next
    position starts a new block has no slot until that block is allocated: -1 there. Returns (positions, slots,
    the rows that need a new block, ascending)."""
    positions = positions + 1
    fresh = np.flatnonzero(positions % block_size == 0)
    slots = slots + 1
    slots[fresh] = -1
    return positions, slots, fresh


@dataclass(slots=True, eq=False)
class DecodeBatch:
    """A steady decode batch: its sequences as rows, and the latest step planned for them as arrays.

    Row ``i`` is ``seqs[i]`` (longest context first, as ``Scheduler.schedule`` orders decodes: ``row_order``).
    The rows never change: when some sequences finish, :meth:`keep` makes a new batch of the others."""

    batch_id: int  # a new id whenever the rows change (the runner and the output side cache per-row work by it)
    seqs: list[Sequence]
    tables: list[list[int]]  # their live block tables
    prompt_lens: np.ndarray  # (rows,) int64
    max_tokens: np.ndarray  # (rows,) int64: max_tokens (a huge number for None)
    stop_anyway: np.ndarray  # (rows,) bool: rows that check_stop must see every step (they have stop_token_ids)
    out: SchedulerOutput  # the latest step planned for these rows
    positions: np.ndarray  # (rows,) int64: the position each row computes in that step
    slots: np.ndarray  # (rows,) int64: where its key and value go
    next_ids: np.ndarray | None = None  # (rows,) int64: the tokens sampled in that step, once post-processed

    @classmethod
    def of(cls, out: SchedulerOutput) -> "DecodeBatch":
        seqs = [e.seq for e in out.scheduled]
        return cls(next(_batch_ids), seqs, list(out.block_tables),
                   np.array([s.num_prompt_tokens for s in seqs], dtype=np.int64),
                   np.array([s.max_tokens if s.max_tokens is not None else 2**62 for s in seqs], dtype=np.int64),
                   np.array([bool(s.sampling_params.stop_token_ids) for s in seqs], dtype=bool),
                   out, np.asarray(out.positions, dtype=np.int64), np.asarray(out.slot_mapping, dtype=np.int64))

    def keep(self, rows: np.ndarray) -> "DecodeBatch":
        """Only these rows (the others finished): a new batch."""
        picked = rows.tolist()
        return DecodeBatch(next(_batch_ids), [self.seqs[i] for i in picked], [self.tables[i] for i in picked],
                           self.prompt_lens[rows], self.max_tokens[rows], self.stop_anyway[rows], self.out,
                           self.positions[rows], self.slots[rows],
                           self.next_ids[rows] if self.next_ids is not None else None)
