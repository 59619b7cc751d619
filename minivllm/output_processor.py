"""The output side of a step: from sampled token ids to what a user sees.

The scheduler only knows tokens. Around it, per request (``n`` samples each), the :class:`OutputProcessor`
keeps the text (a streaming detokenizer and a :class:`~minivllm.stop.StopChecker` per sample), the
logprobs, the timings and a log of steps, and builds the ``RequestOutput`` records. A stop string is found
here, in the text; the sequence is then ended through :meth:`Scheduler.finish <minivllm.scheduler.Scheduler.finish>`
(the scheduler never calls back up). A sample with ``structured_outputs`` has a grammar matcher
(:mod:`minivllm.structured_output`): the engine reads it to mask the logits (:meth:`OutputProcessor.grammar_rows`),
it is advanced here by each new token, and a complete grammar ends the sequence the same way.

Left out: prompt logprobs, beam search, and detokenizing on a thread of its own.
"""

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from minivllm.batch import SchedulerOutput
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepRecord
from minivllm.sampler import SamplerOutput, SamplingBatch, make_generator
from minivllm.sampling_params import SamplingParams
from minivllm.scheduler import Scheduler
from minivllm.sequence import FinishReason, Sequence
from minivllm.stop import StopChecker
from minivllm.structured_output import GrammarCompiler, GrammarMatcher

logger = logging.getLogger("minivllm")


@dataclass(slots=True)
class SampledTokens:
    """One step's sampled rows as Python lists (rows follow ``SchedulerOutput.sample_indices``)."""

    token_ids: list[int] = field(default_factory=list)
    logprob_ids: list[list[int]] | None = None  # (rows, 1 + K): column 0 the sampled token, then the top K
    logprobs: list[list[float]] | None = None

    @classmethod
    def from_sampler(cls, out: SamplerOutput) -> "SampledTokens":
        if out.logprobs is None:
            return cls(out.token_ids.tolist())
        return cls(out.token_ids.tolist(), out.logprobs.token_ids.tolist(), out.logprobs.logprobs.tolist())


@dataclass(slots=True, eq=False)
class _Sample:
    """One of a request's ``n`` samples: its sequence, its text state, its random stream."""

    index: int
    seq: Sequence
    generator: torch.Generator | None
    detokenizer: object | None
    stop: StopChecker
    num_decoded: int = 0  # output tokens already pushed through the detokenizer
    sent_tokens: int = 0  # output tokens already reported
    delta_text: str = ""  # safe text not reported yet
    logprobs: list[dict[int, float]] | None = None
    matcher: GrammarMatcher | None = None  # structured output: the grammar's state after num_accepted tokens
    num_accepted: int = 0
    quiet: bool = False  # nothing to do per step: reported once, with no stop strings, logprobs or grammar


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    final_only: bool = False  # one RequestOutput, when it finishes (LLM.generate): none per step before

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.samples)


class OutputProcessor:
    """Requests' text, logprobs and metrics; ``process(plan, sampled, ...)`` after each step."""

    def __init__(self, scheduler: Scheduler, tokenizer, eos_token_ids: frozenset[int],
                 stop_checker: type[StopChecker] = StopChecker) -> None:
        self.scheduler = scheduler
        self.stop_checker = stop_checker  # the learner's (minivllm.learner) or the package's
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, _Sample]] = {}
        self.step_log: deque[StepRecord] = deque(maxlen=100_000)
        self._grammars: GrammarCompiler | None = None  # built at the first structured-output request
        self._sampling_batch: tuple[list[Sequence], torch.device, SamplingBatch] | None = None  # the last reusable one
        self._texts: dict[int, str] = {}  # token id -> its text alone, when its bytes are whole UTF-8 (_detokenize)
        self._busy: tuple[int, list[int], list] | None = None  # (decode batch id, busy rows, step-log rows)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "prefill_tokens_computed": 0,
                      "cached_prompt_tokens": 0, "requests_finished": 0}

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams,
                    seq_ids: list[int], final_only: bool = False) -> list[Sequence]:
        """Keep a new request (one sample per id in ``seq_ids``); returns its sequences, for the scheduler."""
        grammar = self._compile(params) if params.structured_outputs is not None else None  # NOTE: may raise
        request = _Request(request_id, prompt, ids, params, final_only=final_only)
        children = [params] if params.n == 1 else [params.for_child(i) for i in range(params.n)]
        for index, (p, seq_id) in enumerate(zip(children, seq_ids, strict=True)):
            detok = self.tokenizer.detokenizer(skip_special_tokens=p.skip_special_tokens) if self.tokenizer else None
            request.samples.append(_Sample(
                index=index, seq=Sequence(seq_id, ids, p), generator=None if p.greedy else make_generator(p.seed),
                detokenizer=detok, stop=self.stop_checker(p.stop, p.include_stop_str_in_output),
                logprobs=[] if p.logprobs is not None else None,
                matcher=self._grammars.matcher(grammar) if grammar is not None else None,
                quiet=final_only and not p.stop and p.logprobs is None and grammar is None))
        for sample in request.samples:
            self._by_seq[sample.seq.seq_id] = (request, sample)
        self.requests[request_id] = request
        self.stats["prompt_tokens"] += len(ids)
        return [s.seq for s in request.samples]

    def _compile(self, params: SamplingParams) -> str:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.eos_token_ids)
        return self._grammars.compile(params.structured_outputs)

    def grammar_rows(self, seqs: list[Sequence]) -> list[tuple[int, GrammarMatcher]]:
        """(row, matcher) of the sampled rows ``seqs`` that follow a grammar; empty when none does."""
        if self._grammars is None:
            return []
        rows = []
        for row, seq in enumerate(seqs):
            entry = self._by_seq.get(seq.seq_id)  # NOTE: none for a row the overlapped loop computes in vain
            matcher = entry[1].matcher if entry is not None else None
            if matcher is not None:
                rows.append((row, matcher))
        return rows

    def pop(self, request_id: str) -> _Request | None:
        """Forget a request (aborted); None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for s in request.samples:
                self._by_seq.pop(s.seq.seq_id, None)
            request.metrics.finished_time = time.monotonic()
        return request

    def sampling_batch(self, seqs: list[Sequence], device: torch.device) -> SamplingBatch:
        """The sampler's input for these sequences (their params, tokens so far and random streams).

        The same sequences as the previous step's, in the same order (a steady decode batch), get the same
        batch again when it depends on nothing that changes per step: no penalties (they count the tokens so
        far), no ``min_tokens`` ban left (it only lifts as outputs grow). Fewer of them (the others finished): the
        previous batch's rows for them (``SamplingBatch.select``)."""
        last = self._sampling_batch
        if last is not None and last[1] == device and last[0] == seqs:  # NOTE: list == compares identity first
            return last[2]
        if last is not None and last[1] == device and len(seqs) < len(last[0]):  # some left: keep the others' rows
            where = {id(s): i for i, s in enumerate(last[0])}
            rows = [where.get(id(s)) for s in seqs]
            if None not in rows:
                batch = last[2].select(rows)
                self._sampling_batch = (list(seqs), device, batch)
                return batch
        batch = SamplingBatch.from_requests(
            [s.sampling_params for s in seqs], output_token_ids=[s.output_token_ids for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            generators=[self._generator(s) for s in seqs],
            eos_token_ids=self.eos_token_ids, device=device)
        reusable = batch.penalties is None and batch.banned is None
        self._sampling_batch = (list(seqs), device, batch) if reusable else None
        return batch

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        entry = self._by_seq.get(seq.seq_id)
        if entry is not None:
            return entry[1].generator
        # a finished request's wasted row (the overlapped loop): its draw is dropped, any generator will do
        p = seq.sampling_params
        return make_generator(p.seed) if p.seed is not None and not p.greedy else None

    # ------------------------------------------------------------------ after a step
    def process(self, plan: SchedulerOutput, sampled: SampledTokens, start: float,
                graph: bool = False) -> list[RequestOutput]:
        """Text, stop strings, logprobs, metrics and the step record; an output per request that progressed
        (a ``final_only`` request: only when it finishes).

        A steady decode step (``plan.decode_batch``) visits only the rows with work every step -- a sample that
        streams, has stop strings, logprobs or a grammar -- and the sequences ``postprocess`` ended
        (``plan.ended``). The others (``LLM.generate``'s requests) are detokenized when they finish."""
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        for seq_id in plan.finished:  # the cache could not hold them any longer
            if seq_id in self._by_seq:
                request = self._by_seq[seq_id][0]
                touched[request.request_id] = request
        if plan.decode_batch is None:
            rows = zip(plan.scheduled, itertools.accumulate(e.needs_sample for e in plan.scheduled))
        else:
            scheduled = plan.scheduled
            rows = ((scheduled[i], i + 1) for i in self._busy_rows(plan))
            for seq in plan.ended:
                entry = self._by_seq.get(seq.seq_id)
                if entry is not None:
                    entry[0].metrics.last_token_time = now
                    touched[entry[0].request_id] = entry[0]
        for e, sampled_rows in rows:
            seq = e.seq
            entry = self._by_seq.get(seq.seq_id)
            if entry is None:
                continue  # aborted since the step was planned
            request, sample = entry
            m = request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = start
            m.num_cached_tokens = max(m.num_cached_tokens, seq.num_cached_tokens)
            m.num_preemptions = max(m.num_preemptions, seq.num_preemptions)
            if not e.needs_sample:
                continue
            touched[request.request_id] = request
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if sample.logprobs is not None:
                self._record_logprobs(sample, sampled, sampled_rows - 1)
            if sample.matcher is not None:
                self._advance_grammar(sample)
            if not sample.quiet:  # NOTE: a quiet sample's text is made when it is reported (output)
                self._detokenize(sample)
        self._log(plan, sampled, start, graph)
        return [self._finish_or_keep(r) for r in touched.values() if not r.final_only or r.finished]

    def _busy_rows(self, plan: SchedulerOutput) -> list[int]:
        """The rows of a steady decode batch whose samples need work every step (cached per batch)."""
        if self._busy is None or self._busy[0] != plan.decode_batch:
            rows = [i for i, e in enumerate(plan.scheduled)
                    if (entry := self._by_seq.get(e.seq.seq_id)) is not None and not entry[1].quiet]
            steps = [(e.seq.seq_id, 1, False) for e in plan.scheduled]
            self._busy = (plan.decode_batch, rows, steps)
        return self._busy[1]

    def _record_logprobs(self, sample: _Sample, sampled: SampledTokens, row: int) -> None:
        k = sample.seq.sampling_params.logprobs
        if k is not None and sampled.logprobs is not None and len(sample.logprobs) < sample.seq.num_output_tokens:
            sample.logprobs.append(dict(zip(sampled.logprob_ids[row][: 1 + k], sampled.logprobs[row][: 1 + k])))

    def _advance_grammar(self, sample: _Sample) -> None:
        """Feed the sample's new tokens to its grammar; a complete grammar ends the sequence (``stop``)."""
        seq, matcher = sample.seq, sample.matcher
        while sample.num_accepted < seq.num_output_tokens and not matcher.is_finished:
            token = seq.output_token_ids[sample.num_accepted]
            sample.num_accepted += 1
            if not matcher.accept(token) and token not in self.eos_token_ids:  # NOTE: the mask prevents this
                logger.warning("sequence %d: token %d breaks its grammar (%s); ending it", seq.seq_id, token,
                               matcher.error)
        if matcher.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP)

    def _detokenize(self, sample: _Sample) -> None:
        """Push the sample's new tokens through its detokenizer; a stop string found ends the sequence."""
        seq, detok, stop = sample.seq, sample.detokenizer, sample.stop
        if detok is None:
            sample.num_decoded = seq.num_output_tokens
            return
        min_tokens, outputs, texts = seq.sampling_params.min_tokens, seq.output_token_ids, self._texts
        while sample.num_decoded < len(outputs) and not stop.stopped:
            token = outputs[sample.num_decoded]
            # NOTE: with nothing pending, a token whose bytes are whole UTF-8 gives its own text, whatever the
            # sample: remembered per token id, the detokenizer then sees only special tokens and split characters
            piece = texts.get(token) if not detok.pending else None
            if piece is None:
                alone = not detok.pending
                piece = detok.push(token)
                if alone and not detok.pending and token not in detok.special_ids:
                    texts[token] = piece
            sample.num_decoded += 1
            sample.delta_text += stop.push(piece, check=sample.num_decoded >= min_tokens)
        if stop.stopped:
            self.scheduler.finish(seq, FinishReason.STOP, stop.stop_str)

    def _log(self, plan: SchedulerOutput, sampled: SampledTokens, start: float, graph: bool) -> None:
        # prompt tokens the prefix cache served: counted at each admission's first chunk
        steady = plan.decode_batch is not None and self._busy is not None and self._busy[0] == plan.decode_batch
        cached = 0 if steady else sum(e.start for e in plan.scheduled if e.start and e.start == e.seq.num_cached_tokens)
        prefill = plan.num_prefill_tokens
        self.stats["generation_tokens"] += len(sampled.token_ids) - plan.dropped
        self.stats["prefill_tokens_computed"] += prefill
        self.stats["cached_prompt_tokens"] += cached
        sched = self.scheduler
        self.step_log.append(StepRecord(
            step=plan.step, start=start, end=time.monotonic(), num_decode_tokens=plan.num_decode_tokens,
            num_prefill_tokens=prefill, num_cached_prefill_tokens=cached,
            seqs=self._busy[2] if steady else [(e.seq.seq_id, e.num_new_tokens, e.is_prefill) for e in plan.scheduled],
            preempted=plan.preempted,
            num_running=len(sched.running), num_waiting=len(sched.waiting), kv_blocks_used=sched.num_blocks_used,
            graph=graph))

    def _finish_or_keep(self, request: _Request) -> RequestOutput:
        out = self.output(request)
        if out.finished:  # NOTE: out.metrics is request.metrics: the finished time set here shows in it
            request.metrics.finished_time = time.monotonic()
            self.requests.pop(request.request_id, None)
            for s in request.samples:
                self._by_seq.pop(s.seq.seq_id, None)
            self.stats["requests_finished"] += 1
        return out

    def output(self, request: _Request) -> RequestOutput:
        """The request's ``RequestOutput`` now: text safe to show, and what is new since the last one."""
        outs, finished = [], True
        for s in request.samples:
            seq, stop = s.seq, s.stop
            finished = finished and seq.is_finished
            reason = seq.finish_reason.value if seq.finish_reason is not None else None
            if s.num_decoded < seq.num_output_tokens and not stop.stopped:
                self._detokenize(s)  # a quiet sample's tokens, all at once
            if reason is not None and s.detokenizer is not None and not stop.stopped:
                tail = s.detokenizer.flush()  # the request ended otherwise: held-back text is final
                s.delta_text += (stop.push(tail, check=False) if tail else "") + stop.flush()
            ids = seq.output_token_ids
            new_ids = ids[s.sent_tokens:]
            s.sent_tokens = len(ids)
            # NOTE: the live lists, read up to today's lengths (CompletionOutput): the server reads outputs on
            # another thread while this one appends, and both lists only grow. Arguments by position: this runs per
            # request per step
            outs.append(CompletionOutput(
                s.index, stop.text[: stop.sent], ids,  # index, text, token_ids
                reason, seq.stop_reason,  # finish_reason, stop_reason
                s.logprobs, s.delta_text, new_ids))  # logprobs, deltas
            s.delta_text = ""
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs, finished,
                             request.metrics)
