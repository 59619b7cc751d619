"""``LLMEngine``: requests in, tokens out, one step at a time.

Every step is the same three moves::

    plan    = self.scheduler.schedule()              # who computes which tokens (continuous batching)
    logits  = self.runner.execute(plan)              # one forward pass over the flattened batch
    tokens  = self.sampler(logits, batch)            # one token per sequence that reached its end
    self.scheduler.postprocess(plan, tokens)         # append, stop, free or cache blocks

Around them the engine keeps what a user sees: requests (``n`` samples each), text (a streaming
detokenizer and stop-string checker per sample), logprobs, timings, and a log of steps. It is not
thread-safe: one thread drives it (``LLM`` in a loop, or the server's engine thread).

Left out: several GPUs, swapping KV to the CPU, beam search, prompt logprobs.
"""

import dataclasses
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from minivllm.cache import BlockAllocator, PagedKVCache, RadixCache, bytes_per_block, gpu_kv_budget
from minivllm.config import EngineConfig
from minivllm.model.config import ModelConfig
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepRecord
from minivllm.runner import ModelRunner
from minivllm.sampler import Sampler, SamplingBatch, make_generator
from minivllm.sampling_params import SamplingParams
from minivllm.scheduler import Scheduler, SchedulerConfig
from minivllm.sequence import Sequence
from minivllm.stop import StopChecker


@dataclass(slots=True, eq=False)
class _Sample:
    """One of a request's ``n`` samples: its sequence, its text state, its random stream."""

    index: int
    seq: Sequence
    generator: torch.Generator | None
    detokenizer: object | None
    stop: StopChecker
    sent_tokens: int = 0  # output tokens already reported
    delta_text: str = ""  # safe text not reported yet
    logprobs: list[dict[int, float]] | None = None


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


class LLMEngine:
    """``add_request`` / ``step`` / ``abort``. Build it from an :class:`EngineConfig` or keyword arguments."""

    def __init__(self, config: EngineConfig | None = None, **kwargs) -> None:
        self.config = config = config if config is not None else EngineConfig.from_kwargs(**kwargs)
        self.device, self.dtype = config.torch_device, config.torch_dtype
        self.model, self.tokenizer = _load(config, self.device, self.dtype)
        mc = self.model.config
        # values discovered at run time, set here and only here:
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer is not None else ())
        self.num_kv_blocks = self._num_kv_blocks()
        self.kv_cache = PagedKVCache.allocate(mc, self.num_kv_blocks, block_size=config.block_size,
                                              device=self.device, dtype=self.dtype)
        self.allocator = BlockAllocator(self.num_kv_blocks)
        sched_config = SchedulerConfig(max_num_batched_tokens=config.max_num_batched_tokens,
                                       max_num_seqs=config.max_num_seqs, block_size=config.block_size,
                                       enable_prefix_caching=config.enable_prefix_caching)
        cache = RadixCache(self.allocator, config.block_size) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(sched_config, self.allocator, cache, eos_token_ids=self.eos_token_ids)
        self.scheduler.stop_checker = self._on_token
        self.runner = ModelRunner(self.model, self.kv_cache, max_model_len=self.max_model_len,
                                  attention_backend=config.attention_backend,
                                  use_cuda_graphs=not config.enforce_eager,
                                  cuda_graph_max_batch=min(config.cuda_graph_max_batch, config.max_num_seqs))
        self.sampler = Sampler(torch.Generator().manual_seed(config.seed))
        self.requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, _Sample]] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.step_log: deque[StepRecord] = deque(maxlen=100_000)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "prefill_tokens_computed": 0,
                      "cached_prompt_tokens": 0, "requests_finished": 0}

    # ------------------------------------------------------------------ set-up
    def _num_kv_blocks(self) -> int:
        c, mc = self.config, self.model.config
        if c.num_kv_blocks is not None:
            return c.num_kv_blocks
        per_block = bytes_per_block(mc, self.dtype, c.block_size)
        if self.device.type == "cuda":
            tokens = min(c.max_num_batched_tokens, self.max_model_len)

            def profile():  # the largest prefill step the scheduler may plan, and the logits of max_num_seqs rows
                ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
                hidden = self.model(ids, torch.arange(tokens, device=self.device))
                self.model.compute_logits(hidden[: c.max_num_seqs])

            budget = gpu_kv_budget(self.device, c.gpu_memory_utilization, profile)
        else:
            budget = c.kv_cache_memory
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"no memory is left for the KV cache ({budget:,} bytes, {per_block:,} per block): raise "
                             f"gpu_memory_utilization / kv_cache_memory or lower max_num_batched_tokens")
        return int(blocks)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None) -> str:
        """Queue a prompt (text, or token ids); returns its request id. Raises ``ValueError`` on bad input."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer (a random-weight model): pass token ids")
            ids = self.tokenizer.encode(text, add_special_tokens=True)
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise TypeError("a prompt must be a string or a list of int token ids")
            vocab = self.model.config.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                             f"tokens, which must also hold at least one generated token")
        room = self.max_model_len - len(ids)
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this model's "
                             f"context of {self.max_model_len} tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        request = _Request(request_id, text, ids, params)
        samples = [params] if params.n == 1 else [params.for_child(i) for i in range(params.n)]
        for index, p in enumerate(samples):
            seq = Sequence(next(self._seq_ids), ids, p)
            detok = self.tokenizer.detokenizer(skip_special_tokens=p.skip_special_tokens) if self.tokenizer else None
            sample = _Sample(index, seq, make_generator(p.seed) if not p.greedy else None, detok,
                             StopChecker(p.stop, p.include_stop_str_in_output), logprobs=[] if p.logprobs is not None else None)
            request.samples.append(sample)
        for sample in request.samples:  # after all checks: nothing is queued if any sample is refused
            self.scheduler.add(sample.seq)
            self._by_seq[sample.seq.seq_id] = (request, sample)
        self.requests[request_id] = request
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; every KV block it held is released. None if it is unknown or already done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for sample in request.samples:
            if not sample.seq.is_finished:
                self.scheduler.abort(sample.seq.seq_id)
            self._by_seq.pop(sample.seq.seq_id, None)
        request.metrics.finished_time = time.monotonic()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run, sample, postprocess; returns an output for every request that progressed."""
        start = time.monotonic()
        plan = self.scheduler.schedule()
        touched: dict[str, _Request] = {}
        for seq_id in plan.finished:  # the cache could not hold them any longer
            request, _ = self._by_seq[seq_id]
            touched[request.request_id] = request
        tokens: list[int] = []
        if plan.scheduled:
            logits = self.runner.execute(plan)  # (samples, vocab)
            seqs = plan.sampled_seqs
            if seqs:
                tokens = self._sample(logits, seqs)
        now = time.monotonic()
        for e in plan.scheduled:
            request, _ = self._by_seq[e.seq.seq_id]
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = start
            request.metrics.num_cached_tokens = max(request.metrics.num_cached_tokens, e.seq.num_cached_tokens)
            request.metrics.num_preemptions = max(request.metrics.num_preemptions, e.seq.num_preemptions)
            if e.needs_sample:
                touched[request.request_id] = request
                if request.metrics.first_token_time is None:
                    request.metrics.first_token_time = now
                request.metrics.last_token_time = now
        self.scheduler.postprocess(plan, tokens)
        self.stats["generation_tokens"] += len(tokens)
        self.stats["prefill_tokens_computed"] += plan.num_prefill_tokens
        # prompt tokens the prefix cache served: counted at each admission's first chunk
        cached = sum(e.start for e in plan.scheduled if e.start and e.start == e.seq.num_cached_tokens)
        self.stats["cached_prompt_tokens"] += cached
        self.step_log.append(StepRecord(
            plan.step, start, time.monotonic(), plan.num_decode_tokens, plan.num_prefill_tokens, cached,
            [(e.seq.seq_id, e.num_new_tokens, e.is_prefill) for e in plan.scheduled], plan.preempted,
            len(self.scheduler.running), len(self.scheduler.waiting),
            self.allocator.num_blocks - self.allocator.num_free,
            plan.num_prefill_tokens == 0 and 0 < len(plan.scheduled) <= self.runner.graph_batch))
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self.requests.pop(request.request_id, None)
                for s in request.samples:
                    self._by_seq.pop(s.seq.seq_id, None)
                self.stats["requests_finished"] += 1
            outputs.append(self._output(request))
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        samples = [self._by_seq[s.seq_id][1] for s in seqs]
        params = [s.sampling_params for s in seqs]
        batch = SamplingBatch.from_requests(
            params, output_token_ids=[s.output_token_ids for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs], generators=[x.generator for x in samples],
            eos_token_ids=self.eos_token_ids, device=logits.device)
        out = self.sampler(logits, batch)
        tokens = out.token_ids.tolist()
        if out.logprobs is not None:
            ids, values = out.logprobs.token_ids.tolist(), out.logprobs.logprobs.tolist()
            for row, (sample, p) in enumerate(zip(samples, params)):
                if p.logprobs is not None:
                    k = 1 + p.logprobs
                    sample.logprobs.append(dict(zip(ids[row][:k], values[row][:k])))
        return tokens

    def _on_token(self, seq: Sequence) -> str | None:
        """The scheduler's hook after each appended token: decode it, look for stop strings."""
        _, sample = self._by_seq[seq.seq_id]
        if sample.detokenizer is None:
            return None
        piece = sample.detokenizer.push(seq.output_token_ids[-1])
        check = seq.num_output_tokens >= seq.sampling_params.min_tokens
        sample.delta_text += sample.stop.push(piece, check=check)
        return sample.stop.stop_str

    def _output(self, request: _Request) -> RequestOutput:
        outs = []
        for s in request.samples:
            seq = s.seq
            reason = seq.finish_reason.value if seq.finish_reason is not None else None
            if reason is not None and s.detokenizer is not None and not s.stop.stopped:
                tail = s.detokenizer.flush()  # the request ended otherwise: held-back text is final
                s.delta_text += (s.stop.push(tail, check=False) if tail else "") + s.stop.flush()
            new_ids = seq.output_token_ids[s.sent_tokens:]
            s.sent_tokens = seq.num_output_tokens
            text = s.stop.text[: s.stop.sent]
            # NOTE: copies: the server reads outputs on another thread while this one appends
            outs.append(CompletionOutput(s.index, text, list(seq.output_token_ids), reason, seq.stop_reason,
                                         list(s.logprobs) if s.logprobs is not None else None,
                                         s.delta_text, new_ids))
            s.delta_text = ""
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             request.finished, request.metrics)

    # ------------------------------------------------------------------ health
    def check_no_leaks(self) -> None:
        """Raise unless every KV block is free or held only by the radix cache (no request is running)."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("requests are still running")
        cache = self.scheduler.cache
        cached = cache.evictable_blocks if cache is not None else 0
        if self.allocator.num_free + cached != self.allocator.num_blocks:
            raise RuntimeError(f"leaked KV blocks: {self.allocator.num_free} free + {cached} cached of "
                               f"{self.allocator.num_blocks}")


def _load(config: EngineConfig, device: torch.device, dtype: torch.dtype):
    """The model (with weights) and its tokenizer; a ModelConfig gives random weights and no tokenizer."""
    from minivllm.model import GGUFFile, Qwen3ForCausalLM, load_model, resolve_model_path
    from minivllm.tokenizer import Tokenizer

    if isinstance(config.model, ModelConfig):
        model = Qwen3ForCausalLM(config.model, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(config.seed)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        return model.eval(), None
    path = resolve_model_path(config.model)
    if path.is_dir():  # a checkpoint without tokenizer.json still runs, on token ids
        tokenizer = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
        return load_model(path, device=device, dtype=dtype, progress=False), tokenizer
    file = GGUFFile(path)
    return load_model(file, device=device, dtype=dtype, progress=False), Tokenizer.from_gguf(file)
