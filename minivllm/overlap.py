"""The engine's overlapped loop (``LLMEngine(async_scheduling=True)``, vLLM's async scheduling).

On a GPU the plain step (schedule, execute, sample, postprocess, process) leaves the device idle while the host
plans, post-processes and detokenizes. In a steady decode batch the next step does not need this step's tokens
on the host: the scheduler can plan it ahead (every running sequence decodes once more,
:meth:`Scheduler.schedule_ahead <minivllm.scheduler.Scheduler.schedule_ahead>`) and its input tokens can be
read on the device from this step's sampled tokens. So a call of :meth:`OverlappedLoop.step` with step N's
forward pass in flight::

    ahead   = scheduler.schedule_ahead(N.plan)        # step N+1, planned before N's tokens are known
    staged  = runner.prepare(ahead)                   # its inputs copied to the device (asynchronously)
    tokens  = sample(N) -> pinned host buffer, event  # N's sampler, queued behind N's forward pass
    runner.launch(staged, tokens[ahead.pending_inputs])  # N+1's forward pass, queued behind N's sampler
    wait for N's tokens; scheduler.postprocess(N); processor.process(N)   # while the device runs N+1

returns step N's outputs (one step later than the plain loop). A sequence that N's token ends by an EOS, a stop
token or a stop string has computed one wasted token in N+1, which ``postprocess`` drops (one that reaches
``max_tokens`` in N is left out of N+1). When N finished the last request, N+1 (wasted rows only) is retired in the
same call, so an idle engine holds no step in flight and the call that returns the last output is the last one
needed. Its KV blocks are freed before N+1 has run, which is safe because the
device runs every later use of those blocks after N+1. N's sampler is queued only after N-1 was post-processed,
so penalties, ``min_tokens`` and grammars see every token before it. When N+1 cannot be planned ahead (someone
may be admitted, memory is short, a prefill is running), the call ends like a plain step.

A call that raises leaves the engine as a failed plain step does, so the server's retry (``minivllm.server.
async_engine``) recomputes that step: a step ahead planned on its tokens is dropped (tests/test_17_overlap.py fails
each piece of the step in turn).

On a CPU nothing runs concurrently (each op computes when it is called), so the loop gives the same tokens for
the same work; it exists there to be tested. Left out: more than one step in flight, tensor parallelism (the
workers would need the sampled tokens of the step before).
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

from minivllm.batch import SchedulerOutput
from minivllm.output_processor import SampledTokens
from minivllm.outputs import RequestOutput
from minivllm.sampler import SamplerOutput


@dataclass(slots=True)
class InFlight:
    """A step whose forward pass is queued on the device, not yet sampled."""

    plan: SchedulerOutput
    logits: torch.Tensor
    start: float
    graph: bool


class HostCopy:
    """A step's sampled tokens (and logprobs) on their way to the host: copies queued into pinned buffers behind
    the sampler, and an event that says they landed. On a CPU they are already there."""

    def __init__(self, out: SamplerOutput, pinned: dict[str, torch.Tensor]) -> None:
        self.device_tokens = out.token_ids  # stays on the device: the next step's input tokens are read from it
        tensors = {"token_ids": out.token_ids}
        if out.logprobs is not None:
            tensors |= {"logprob_ids": out.logprobs.token_ids, "logprobs": out.logprobs.logprobs}
        if out.token_ids.device.type != "cuda":
            self.host, self.event = tensors, None
            return
        self.host = {}
        for name, t in tensors.items():
            buffer = pinned.get(name)
            if buffer is None or buffer.numel() < t.numel() or buffer.dtype != t.dtype:
                buffer = pinned[name] = torch.empty(max(2 * t.numel(), 1024), dtype=t.dtype, pin_memory=True)
            self.host[name] = buffer[: t.numel()].view(t.shape)
            self.host[name].copy_(t, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> SampledTokens:
        if self.event is not None:
            self.event.synchronize()
        h = self.host
        if "logprobs" not in h:
            return SampledTokens(h["token_ids"].tolist())
        return SampledTokens(h["token_ids"].tolist(), h["logprob_ids"].tolist(), h["logprobs"].tolist())


class OverlappedLoop:
    """The overlapped loop's state for one engine: the step in flight and the pinned buffers for sampled tokens."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.now: InFlight | None = None  # a step queued on the device, not yet sampled
        self.pinned: dict[str, torch.Tensor] = {}

    @property
    def in_flight(self) -> bool:
        return self.now is not None

    def step(self, plan_ahead: bool = True) -> list[RequestOutput]:
        """Returns the outputs of the step in flight (or of a step planned now, if none was), after queuing the
        next one when it can be planned ahead (and ``plan_ahead``)."""
        engine = self.engine
        scheduler, runner = engine.scheduler, engine.runner
        start = time.monotonic()
        now, self.now = self.now, None
        if now is None:  # nothing queued: plan this step in full, as the plain loop does
            plan = scheduler.schedule()
            prepared = runner.prepare(plan)
            if prepared is None:  # nothing to run (the plan may still have finished someone)
                scheduler.postprocess(plan, [])
                return engine.processor.process(plan, SampledTokens(), start)
            now = InFlight(plan, runner.launch(prepared), start, prepared.bucket > 0)
        ahead = scheduler.schedule_ahead(now.plan) if plan_ahead else None
        prepared = runner.prepare(ahead) if ahead is not None else None
        sampled = engine.sample_tensors(now.logits, now.plan)  # None: only prefill chunks (then no step ahead)
        copy = HostCopy(sampled, self.pinned) if sampled is not None else None
        if prepared is not None:
            ids, rows = copy.device_tokens, ahead.pending_inputs
            if len(rows) != len(ids):  # some sequences ended: their rows are not read
                ids = ids[runner.to_device("pending_inputs", rows, np.int64)]
            self.now = InFlight(ahead, runner.launch(prepared, ids), time.monotonic(), prepared.bucket > 0)
        # NOTE: only step N's work is waited for; step N+1 keeps the device busy meanwhile
        try:
            tokens = copy.wait() if copy is not None else SampledTokens()
            scheduler.postprocess(now.plan, tokens.token_ids)
        except BaseException:  # N+1 was planned on N's tokens, which never arrived: drop it, the next call plans
            self.now = None  # from the scheduler's state again (N not advanced: a retry recomputes N, as the
            raise  # plain loop's does)
        outputs = engine.processor.process(now.plan, tokens, now.start, graph=now.graph)
        if self.now is not None and not scheduler.has_unfinished():  # N finished the last request: N+1 holds only
            outputs += self.step(plan_ahead=False)  # wasted rows; retired now (no output), not on some later call
        return outputs
