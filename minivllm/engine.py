"""``LLMEngine``: requests in, tokens out, one step at a time.

Every step is the same five moves (:meth:`LLMEngine.step`)::

    plan    = self.scheduler.schedule()                  # who computes which tokens (continuous batching)
    logits  = self.runner.execute(plan)                  # one forward pass over the flattened batch
    sampled = self.sample(logits, plan)                  # one token per sequence that reached its end
    self.scheduler.postprocess(plan, sampled.token_ids)  # append; EOS, stop tokens, length end sequences
    return self.processor.process(plan, sampled, start)  # text, stop strings, logprobs -> RequestOutputs

Records flow down, never back up: the scheduler plans in a ``SchedulerOutput`` (``minivllm.batch``),
the runner reads it, the :class:`~minivllm.output_processor.OutputProcessor` turns sampled tokens into
text and ends a sequence on a stop string through ``Scheduler.finish``. Requests are checked by the
:class:`~minivllm.inputs.InputProcessor` before anything is queued. It is not thread-safe: one thread
drives it (``LLM`` in a loop, or the server's engine thread).

With ``tensor_parallel_size > 1`` the model is split over worker processes (``minivllm.distributed``):
rank 0 runs all of the above, the workers only the forward pass of each plan.

**Overlapped steps** (``async_scheduling``, vLLM's async scheduling; on by default on one GPU): step N+1 is
planned and launched before step N's tokens reach the host, and N is post-processed while N+1 runs
(:mod:`minivllm.overlap`).

Left out: pipeline parallelism, swapping KV to the CPU, beam search, prompt logprobs.
"""

import itertools
import time
from collections import deque

import torch

from minivllm.cache import PagedKVCache, gpu_memory_baseline
from minivllm.components import load_model_and_tokenizer, num_kv_blocks
from minivllm.config import EngineConfig
from minivllm import learner
from minivllm.generation_config import load_generation_defaults
from minivllm.inputs import InputProcessor
from minivllm.output_processor import OutputProcessor, SampledTokens
from minivllm.outputs import EngineSnapshot, RequestOutput, StepRecord
from minivllm.overlap import OverlappedLoop
from minivllm.runner import ModelRunner
from minivllm.sampler import SamplerOutput
from minivllm.sampling_params import SamplingParams
from minivllm.scheduler import Scheduler
from minivllm.structured_output import apply_bitmask, fill_bitmask


class LLMEngine:
    """``add_request`` / ``step`` / ``abort``. Build it from an :class:`EngineConfig` or keyword arguments."""

    def __init__(self, config: EngineConfig | None = None, **kwargs) -> None:
        self.config = config = config if config is not None else EngineConfig.from_kwargs(**kwargs)
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.tp = None  # tensor parallelism (minivllm.distributed): rank 0's side, when tensor_parallel_size > 1
        if config.tensor_parallel_size > 1:
            from minivllm.distributed.executor import TensorParallelExecutor

            self.tp = TensorParallelExecutor.start(config)  # workers started; this rank's shard loaded
            self.model, self.tokenizer = self.tp.model, self.tp.tokenizer
        else:  # what the GPU holds before this engine's weights: its gpu_memory_utilization is its own share
            baseline = gpu_memory_baseline(self.device) if self.device.type == "cuda" else None
            self.model, self.tokenizer = load_model_and_tokenizer(config)
        mc = self.model.config
        # NOTE: values discovered at run time, set here and only here
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer is not None else ())
        if self.tp is None:
            self.num_kv_blocks = num_kv_blocks(config, self.model, self.max_model_len, baseline)
        else:  # every rank's budget for its own KV heads; the smallest wins
            self.num_kv_blocks = self.tp.agree_num_kv_blocks(self.max_model_len)
        kv_shape = mc.kv_shape if self.tp is None else self.model.shard_config.kv_shape  # this rank's KV heads
        self.kv_cache = PagedKVCache.allocate(kv_shape, self.num_kv_blocks, block_size=config.block_size,
                                              device=self.device, dtype=config.torch_kv_cache_dtype)
        parts = self._learner_parts()
        self.scheduler = learner.scheduler_class(parts).from_num_blocks(config.scheduler_config, self.num_kv_blocks,
                                                                         self.eos_token_ids)
        self.runner = ModelRunner(self.model, self.kv_cache, max_model_len=self.max_model_len,
                                  attention_backend=config.attention_backend,
                                  use_cuda_graphs=not config.enforce_eager and self.tp is None,
                                  cuda_graph_max_batch=min(config.cuda_graph_max_batch, config.max_num_seqs),
                                  cuda_graph_max_tokens=min(config.cuda_graph_max_tokens,
                                                            config.scheduler_config.max_num_batched_tokens))
        if self.tp is not None:  # sends each step's plan to the workers, then runs rank 0's part
            self.runner = self.tp.wrap(self.runner)
        self.sampler = learner.sampler_class(parts)(torch.Generator().manual_seed(config.seed))
        self.inputs = InputProcessor(self.tokenizer, mc.vocab_size, self.max_model_len,
                                     load_generation_defaults(config.model))
        self.processor = OutputProcessor(self.scheduler, self.tokenizer, self.eos_token_ids,
                                         stop_checker=learner.stop_checker_class(parts))
        self.learner_step = parts.functions.get("step")  # phase 12's step, when the learner's engine has it
        self.overlap = config.overlaps and self.tp is None  # step() runs the overlapped loop (switchable)
        self.loop = OverlappedLoop(self)  # its state: the step in flight, pinned buffers for sampled tokens
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at interpreter exit). Idempotent."""
        if self.tp is not None:
            self.tp.close()

    def _learner_parts(self) -> "learner.LearnerParts":
        """The learner's passed components (``config.learner``), or none; the model's kernels follow suit."""
        folder = self.config.learner
        if folder is False:
            parts = learner.LearnerParts()
        else:
            parts = learner.load_parts(None if folder is True else folder, self.device)
            print("the learner's engine:\n  " + "\n  ".join(parts.lines()), flush=True)
        learner.install_kernels(parts)
        self.learner_report = parts.report  # (component, "yours" / "package", why); empty: the package's engine
        return parts

    @property
    def allocator(self):
        return self.scheduler.allocator

    @property
    def stats(self) -> dict[str, int]:
        """Running totals: prompt / generated tokens, prefill tokens computed and served by the cache, requests."""
        return self.processor.stats

    @property
    def step_log(self) -> deque[StepRecord]:
        return self.processor.step_log

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, final_only: bool = False) -> str:
        """Queue a prompt (text, or token ids); returns its request id. Raises ``ValueError`` on bad input.

        ``final_only``: ``step()`` reports the request once, when it finishes (vLLM's ``FINAL_ONLY`` output
        kind, what ``LLM.generate`` needs), instead of after every step that gave it a token."""
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids, params = self.inputs.process(prompt, params)
        self.scheduler.blocks.check_fits(len(ids), params.max_tokens)  # NOTE: before anything is queued
        seq_ids = [next(self._seq_ids) for _ in range(params.n)]
        for seq in self.processor.add_request(request_id, text, ids, params, seq_ids, final_only):
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; every KV block it held is released. None if it is unknown or already done."""
        request = self.processor.pop(request_id)
        if request is None:
            return None
        for sample in request.samples:
            if not sample.seq.is_finished:
                self.scheduler.abort(sample.seq.seq_id)
        return self.processor.output(request)

    def has_unfinished_requests(self) -> bool:
        """Whether some request has not been handed back finished yet (vLLM's meaning): a loop of ``step()`` while
        this holds sees every request's last output. The overlapped loop retires its step of wasted rows in the call
        that hands back the last output (``minivllm.overlap``); one still in flight after the last request was
        aborted is not a request either, and the next ``step()`` retires it."""
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.processor.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, sample, postprocess; returns an output for every request that progressed."""
        if self.learner_step is not None:
            return self.learner_step(self)
        if self.overlap or self.loop.in_flight:  # NOTE: switched off with a step in flight: that one finishes first
            return self.loop.step(plan_ahead=self.overlap)
        start = time.monotonic()
        plan = self.scheduler.schedule()
        logits = self.runner.execute(plan)  # (sampled rows, vocab); None when nothing was scheduled
        sampled = self.sample(logits, plan)
        self.scheduler.postprocess(plan, sampled.token_ids)
        return self.processor.process(plan, sampled, start, graph=self.runner.last_step_graph)

    def sample(self, logits: torch.Tensor | None, plan) -> SampledTokens:
        out = self.sample_tensors(logits, plan)
        return SampledTokens() if out is None else SampledTokens.from_sampler(out)

    def sample_tensors(self, logits: torch.Tensor | None, plan) -> SamplerOutput | None:
        """The sampler's tensors (on the logits' device) for the plan's sampled rows; None if none."""
        seqs = plan.sampled_seqs
        if logits is None or not seqs:
            return None
        grammars = self.processor.grammar_rows(seqs)  # structured output: mask what the grammar forbids
        if grammars:  # NOTE: on a GPU this CPU work overlaps the forward pass the runner has queued
            bitmask = fill_bitmask([m for _, m in grammars])
            logits = apply_bitmask(logits, bitmask, [row for row, _ in grammars])
        return self.sampler(logits, self.processor.sampling_batch(seqs, logits.device))

    def use_scheduler(self, scheduler: Scheduler) -> None:
        """Swap in another scheduler over the same KV blocks (a policy to try); only with no request in flight."""
        if self.has_unfinished_requests() or scheduler.allocator is not self.scheduler.allocator:
            raise RuntimeError("a new scheduler needs an idle engine and the engine's own BlockAllocator")
        if self.loop.in_flight:  # only wasted rows (no request is unfinished): retired by the scheduler that planned it
            self.loop.step(plan_ahead=False)
        self.scheduler = self.processor.scheduler = scheduler
        self.check_no_leaks()

    # ------------------------------------------------------------------ state
    def snapshot(self) -> EngineSnapshot:
        """A small public view of the engine's state (what ``/metrics`` and dashboards read)."""
        sched, cache, stats = self.scheduler, self.scheduler.cache, self.processor.stats
        cache_stats = cache.stats() if cache is not None else None
        return EngineSnapshot(
            running=len(sched.running), waiting=len(sched.waiting), kv_blocks_used=sched.num_blocks_used,
            kv_blocks_cached=cache_stats.evictable_blocks if cache_stats else 0, num_kv_blocks=self.num_kv_blocks,
            prompt_tokens=stats["prompt_tokens"], generation_tokens=stats["generation_tokens"],
            cache_hit_rate=cache_stats.token_hit_rate if cache_stats else 0.0, steps=sched.num_steps,
            num_preemptions=sched.num_preemptions, requests_finished=stats["requests_finished"])

    def check_no_leaks(self) -> None:
        """Raise unless every KV block is free or held only by the radix cache (no request is running)."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("requests are still running")
        cache, allocator = self.scheduler.cache, self.scheduler.allocator
        cached = cache.evictable_blocks if cache is not None else 0
        if allocator.num_free + cached != allocator.num_blocks:
            raise RuntimeError(f"leaked KV blocks: {allocator.num_free} free + {cached} cached of "
                               f"{allocator.num_blocks}")
