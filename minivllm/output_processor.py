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


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

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
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "prefill_tokens_computed": 0,
                      "cached_prompt_tokens": 0, "requests_finished": 0}

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams,
                    seq_ids: list[int]) -> list[Sequence]:
        """Keep a new request (one sample per id in ``seq_ids``); returns its sequences, for the scheduler."""
        grammar = self._compile(params) if params.structured_outputs is not None else None  # NOTE: may raise
        request = _Request(request_id, prompt, ids, params)
        children = [params] if params.n == 1 else [params.for_child(i) for i in range(params.n)]
        for index, (p, seq_id) in enumerate(zip(children, seq_ids, strict=True)):
            detok = self.tokenizer.detokenizer(skip_special_tokens=p.skip_special_tokens) if self.tokenizer else None
            request.samples.append(_Sample(
                index=index, seq=Sequence(seq_id, ids, p), generator=None if p.greedy else make_generator(p.seed),
                detokenizer=detok, stop=self.stop_checker(p.stop, p.include_stop_str_in_output),
                logprobs=[] if p.logprobs is not None else None,
                matcher=self._grammars.matcher(grammar) if grammar is not None else None))
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
            matcher = self._by_seq[seq.seq_id][1].matcher
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
        """The sampler's input for these sequences (their params, tokens so far and random streams)."""
        return SamplingBatch.from_requests(
            [s.sampling_params for s in seqs], output_token_ids=[s.output_token_ids for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            generators=[self._by_seq[s.seq_id][1].generator for s in seqs],
            eos_token_ids=self.eos_token_ids, device=device)

    # ------------------------------------------------------------------ after a step
    def process(self, plan: SchedulerOutput, sampled: SampledTokens, start: float,
                graph: bool = False) -> list[RequestOutput]:
        """Text, stop strings, logprobs, metrics and the step record; an output per request that progressed."""
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        for seq_id in plan.finished:  # the cache could not hold them any longer
            if seq_id in self._by_seq:
                request = self._by_seq[seq_id][0]
                touched[request.request_id] = request
        row = 0
        for e in plan.scheduled:
            entry = self._by_seq.get(e.seq.seq_id)
            if e.needs_sample:
                row += 1
            if entry is None:
                continue  # aborted since the step was planned
            request, sample = entry
            m = request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = start
            m.num_cached_tokens = max(m.num_cached_tokens, e.seq.num_cached_tokens)
            m.num_preemptions = max(m.num_preemptions, e.seq.num_preemptions)
            if e.needs_sample:
                touched[request.request_id] = request
                if m.first_token_time is None:
                    m.first_token_time = now
                m.last_token_time = now
                self._record_logprobs(sample, sampled, row - 1)
                if sample.matcher is not None:
                    self._advance_grammar(sample)
                self._detokenize(sample)
        self._log(plan, sampled, start, graph)
        return [self._finish_or_keep(request) for request in touched.values()]

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
        seq = sample.seq
        if sample.detokenizer is None:
            sample.num_decoded = seq.num_output_tokens
            return
        min_tokens = seq.sampling_params.min_tokens
        while sample.num_decoded < seq.num_output_tokens and not sample.stop.stopped:
            piece = sample.detokenizer.push(seq.output_token_ids[sample.num_decoded])
            sample.num_decoded += 1
            sample.delta_text += sample.stop.push(piece, check=sample.num_decoded >= min_tokens)
        if sample.stop.stopped:
            self.scheduler.finish(seq, FinishReason.STOP, sample.stop.stop_str)

    def _log(self, plan: SchedulerOutput, sampled: SampledTokens, start: float, graph: bool) -> None:
        # prompt tokens the prefix cache served: counted at each admission's first chunk
        cached = sum(e.start for e in plan.scheduled if e.start and e.start == e.seq.num_cached_tokens)
        self.stats["generation_tokens"] += len(sampled.token_ids)
        self.stats["prefill_tokens_computed"] += plan.num_prefill_tokens
        self.stats["cached_prompt_tokens"] += cached
        sched = self.scheduler
        self.step_log.append(StepRecord(
            step=plan.step, start=start, end=time.monotonic(), num_decode_tokens=plan.num_decode_tokens,
            num_prefill_tokens=plan.num_prefill_tokens, num_cached_prefill_tokens=cached,
            seqs=[(e.seq.seq_id, e.num_new_tokens, e.is_prefill) for e in plan.scheduled], preempted=plan.preempted,
            num_running=len(sched.running), num_waiting=len(sched.waiting), kv_blocks_used=sched.num_blocks_used,
            graph=graph))

    def _finish_or_keep(self, request: _Request) -> RequestOutput:
        if request.finished:
            request.metrics.finished_time = time.monotonic()
            self.requests.pop(request.request_id, None)
            for s in request.samples:
                self._by_seq.pop(s.seq.seq_id, None)
            self.stats["requests_finished"] += 1
        return self.output(request)

    def output(self, request: _Request) -> RequestOutput:
        """The request's ``RequestOutput`` now: text safe to show, and what is new since the last one."""
        outs = []
        for s in request.samples:
            seq = s.seq
            reason = seq.finish_reason.value if seq.finish_reason is not None else None
            if reason is not None and s.detokenizer is not None and not s.stop.stopped:
                tail = s.detokenizer.flush()  # the request ended otherwise: held-back text is final
                s.delta_text += (s.stop.push(tail, check=False) if tail else "") + s.stop.flush()
            new_ids = seq.output_token_ids[s.sent_tokens:]
            s.sent_tokens = seq.num_output_tokens
            # NOTE: copies: the server reads outputs on another thread while this one appends
            outs.append(CompletionOutput(
                index=s.index, text=s.stop.text[: s.stop.sent], token_ids=list(seq.output_token_ids),
                finish_reason=reason, stop_reason=seq.stop_reason,
                logprobs=list(s.logprobs) if s.logprobs is not None else None, delta_text=s.delta_text,
                delta_token_ids=new_ids))
            s.delta_text = ""
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=outs, finished=request.finished,
                             metrics=request.metrics)
