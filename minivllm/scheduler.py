"""Continuous batching: which sequences compute which tokens in the next step.

Each step the :class:`Scheduler` fills a token budget (``max_num_batched_tokens``) with at most
``max_num_seqs`` sequences: first one decode token for every running sequence that is generating, then
prefill chunks of running sequences whose prompt is not done, then new (or preempted) sequences from the
waiting queue, first come first served. A long prompt is split into chunks across steps (chunked
prefill) and shares each step with the decodes. At admission the radix cache gives the longest cached
prefix: those blocks are locked and not recomputed (a fully cached prompt still computes its last
token). When KV blocks run out, cached blocks are evicted first; then the newest running sequence is
preempted (its blocks released, recomputed later) and goes back to the front of the waiting queue.

After the model ran, :meth:`Scheduler.postprocess` appends the sampled tokens and ends sequences on the
token-level rules of :func:`minivllm.stop.check_stop` (EOS, ``stop_token_ids``, ``max_tokens``). Stop
*strings* live in the text, which is the output side's: it ends a sequence through :meth:`Scheduler.finish`.

Blocks are the :class:`~minivllm.block_manager.BlockManager`'s business (prefix hits, growing and releasing
tables, the reference rules); the scheduler only asks it how many tokens fit.

Left out: the model (``postprocess`` takes the sampled token ids), sampling, text, swapping KV to the
CPU, priorities.
"""

import bisect
from collections.abc import Iterable
from minivllm.batch import ScheduledSequence, SchedulerOutput
from minivllm.block_manager import BlockManager
from minivllm.cache import BlockAllocator, RadixCache
from minivllm.cache.block_table import token_slots
from minivllm.config import SchedulerConfig
from minivllm.sequence import FinishReason, Sequence, SequenceStatus
from minivllm.stop import check_stop

__all__ = ["ScheduledSequence", "Scheduler", "SchedulerConfig", "SchedulerOutput"]


class Scheduler:
    """Waiting and running queues over one :class:`BlockAllocator` (and a :class:`RadixCache`, optional).

    ``schedule()`` plans a step; the model runs it; ``postprocess(output, sampled)`` appends one sampled
    token per ``output.sample_indices`` row and finishes sequences (``finish`` ends one from outside, for a
    stop string). The radix cache is built here (``config.enable_prefix_caching``) unless one is passed
    in. Policy hooks a subclass may override:
    :meth:`select_victim` (whom to preempt), :meth:`prefill_chunk` (how much of a prompt to compute) and
    :meth:`max_cached_tokens` (how much of a prompt the prefix cache may serve).
    """

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator, cache: RadixCache | None = None,
                 eos_token_ids: Iterable[int] = ()) -> None:
        if cache is None and config.enable_prefix_caching:
            cache = RadixCache(allocator, config.block_size)  # NOTE: the one place a RadixCache is built
        self.config = config
        self.allocator = allocator
        self.cache = cache if config.enable_prefix_caching else None
        self.blocks = BlockManager(allocator, self.cache, config.block_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []  # FCFS: sorted by arrival (preempted sequences go back in order)
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_steps = 0
        self.num_preemptions = 0
        self._seqs: dict[int, Sequence] = {}

    @classmethod
    def from_num_blocks(cls, config: SchedulerConfig, num_blocks: int, eos_token_ids: Iterable[int] = ()) -> "Scheduler":
        """A scheduler over a new :class:`BlockAllocator` of ``num_blocks`` blocks (the engine's way)."""
        return cls(config, BlockAllocator(num_blocks), eos_token_ids=eos_token_ids)

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (raises if it can never fit in the KV cache)."""
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already in use")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is not new (status {seq.status.value})")
        self.blocks.check_fits(seq.num_tokens, seq.max_tokens)
        self._seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def abort(self, seq_id: int) -> Sequence:
        """Finish a sequence now with reason ``abort``; every KV block it held is released."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"no live sequence with id {seq_id}")
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.release(seq, cache_blocks=False)
        self._finish(seq, FinishReason.ABORT)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_blocks_used(self) -> int:
        return self.blocks.num_blocks_used

    # ------------------------------------------------------------------ policy hooks
    def select_victim(self) -> Sequence:
        """The running sequence to preempt when blocks run out: the newest (FCFS keeps the oldest going)."""
        return max(self.running, key=lambda s: s.arrival)

    def max_cached_tokens(self, seq: Sequence) -> int:
        """How many of ``seq``'s tokens the prefix cache may serve at admission: all but the last (its logits are needed)."""
        return seq.num_tokens - 1

    def prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """How many of ``seq``'s uncomputed tokens to compute this step, given ``budget`` tokens left."""
        return min(seq.num_tokens - seq.num_computed_tokens, budget)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        """Plan the next step (:meth:`plan`) and lay it out for the model runner: decodes first, then prefills."""
        plan, preempted, finished = self.plan()
        scheduled = sorted((self._entry(seq, n) for seq, n in plan.items()), key=lambda e: (e.is_prefill, e.seq.arrival))
        self.num_steps += 1
        return self._build(scheduled, preempted, finished)

    def plan(self) -> tuple[dict[Sequence, int], list[int], list[int]]:
        """The policy: who computes how many new tokens this step, who was preempted, who was finished.

        Decodes, then prefill chunks of running sequences, then admissions; blocks are grown for every planned
        token. Returns ``({seq: num_new_tokens}, preempted seq ids, finished seq ids)``. The learner's engine
        runs the learner's ``schedule(sched)`` of phase 11 here instead (``minivllm.learner``)."""
        budget = self.config.max_num_batched_tokens
        plan: dict[Sequence, int] = {}
        preempted: list[int] = []
        finished: list[int] = []
        decodes = [s for s in self.running if not s.is_prefill]
        prefills = [s for s in self.running if s.is_prefill]
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            n = 1 if not seq.is_prefill else self.prefill_chunk(seq, budget)
            if n <= 0:
                continue
            while True:
                fit = self.blocks.fit(seq, n)
                if fit == n or (seq.is_prefill and fit > 0):
                    break
                if len(self.running) == 1:  # alone and still no room: the cache can never hold it
                    self.finish(seq, FinishReason.LENGTH)
                    finished.append(seq.seq_id)
                    fit = 0
                    break
                victim = self.select_victim()
                budget += plan.pop(victim, 0)
                self.preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    fit = 0
                    break
            if fit > 0:
                self.blocks.grow(seq, fit)
                plan[seq] = fit
                budget -= fit
        if not preempted:  # NOTE: no admissions in a step that had to preempt (the memory is short)
            self._admit(plan, budget)
        return plan, preempted, finished

    def _admit(self, plan: dict[Sequence, int], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # NOTE: the last token is always computed: its logits give the next one
            self.blocks.match_prefix(seq, min(self.max_cached_tokens(seq), seq.num_tokens - 1))
            fit = self.blocks.fit(seq, self.prefill_chunk(seq, budget))
            if fit <= 0:  # FCFS: nobody overtakes the head of the queue
                self.blocks.release(seq, cache_blocks=False)
                break
            self.admit(seq)
            self.blocks.grow(seq, fit)
            plan[seq] = fit
            budget -= fit

    def admit(self, seq: Sequence) -> None:
        """Move ``seq``, the head of the waiting queue, to the running queue (kept in arrival order)."""
        if not self.waiting or self.waiting[0] is not seq:
            raise ValueError(f"sequence {seq.seq_id} is not the head of the waiting queue (FCFS)")
        self.waiting.pop(0)
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def _entry(self, seq: Sequence, n: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        # (seq, num_new_tokens, start, is_prefill, needs_sample): by position, ~2x faster than keywords
        return ScheduledSequence(seq, n, start, seq.is_prefill, start + n == seq.num_tokens)

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence's blocks back (its full blocks go to the radix cache); it waits, to be recomputed."""
        self.running.remove(seq)
        self.blocks.release(seq, cache_blocks=True)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def _build(self, scheduled: list[ScheduledSequence], preempted: list[int], finished: list[int]) -> SchedulerOutput:
        out = SchedulerOutput(step=self.num_steps, scheduled=scheduled, preempted=preempted, finished=finished)
        bs = self.config.block_size
        input_ids, positions, slots = out.input_ids, out.positions, out.slot_mapping
        for e in scheduled:
            seq, start = e.seq, e.start
            end = start + e.num_new_tokens
            table = seq.block_table
            input_ids += seq.tokens(start, end)  # NOTE: only this step's tokens are read (a decode: one)
            positions += range(start, end)
            slots += token_slots(table, start, end, bs)
            out.cu_seqlens_q.append(len(input_ids))
            out.seq_lens.append(end)
            out.block_tables.append(table)  # NOTE: the live table; the runner reads it before the next schedule()
            if e.needs_sample:
                out.sample_indices.append(len(input_ids) - 1)
        return out

    # ------------------------------------------------------------------ after the model ran
    def postprocess(self, output: SchedulerOutput, sampled_token_ids: Iterable[int]) -> list[Sequence]:
        """Record the step: advance computed tokens, append one sampled token per sampled row, finish sequences.

        Returns the sequences that finished in this step."""
        sampled = list(sampled_token_ids)
        if len(sampled) != len(output.sample_indices):
            raise ValueError(f"expected {len(output.sample_indices)} sampled token ids (one per sample row), "
                             f"got {len(sampled)}")
        tokens = iter(sampled)
        done = []
        for e in output.scheduled:
            seq = e.seq
            token = next(tokens) if e.needs_sample else None
            if seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens != e.start:
                continue  # aborted (or preempted) since the step was planned: drop its result
            seq.num_computed_tokens += e.num_new_tokens
            if token is None:
                continue
            seq.output_token_ids.append(int(token))
            finish = check_stop(seq.sampling_params, seq.output_token_ids, self.eos_token_ids)
            if finish is not None:
                self.running.remove(seq)
                self.blocks.release(seq, cache_blocks=True)
                self._finish(seq, FinishReason(finish.reason), finish.stop_reason)
                done.append(seq)
        return done

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        """End a running or waiting sequence from outside (the output side found a stop string in its text).

        Its full computed blocks go to the radix cache. A sequence that ``postprocess`` just ended for
        ``length`` takes the stop instead (the stop string was in its last token's text, as vLLM reports it).
        """
        if seq.is_finished:
            if seq.finish_reason is FinishReason.LENGTH and reason is FinishReason.STOP:
                seq.finish_reason, seq.stop_reason = reason, stop_reason
            return
        if self._seqs.get(seq.seq_id) is not seq:
            raise KeyError(f"sequence {seq.seq_id} is not this scheduler's")
        (self.running if seq in self.running else self.waiting).remove(seq)
        self.blocks.release(seq, cache_blocks=True)
        self._finish(seq, reason, stop_reason)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, reason, stop_reason
        seq.num_computed_tokens = 0
        del self._seqs[seq.seq_id]
