"""The host behind the device (issue 17): the steady-decode fast path and the overlapped loop, each against the
plain definition it replaces.

* ``Scheduler``'s fast path (a steady decode batch planned from arrays) against ``Scheduler.plan`` itself: every
  field of every plan, every post-processing outcome, block tables and queues, on random workloads with chunked
  prefill, prefix hits, preemption, EOS, stop tokens, ``max_tokens`` and aborts;
* ``Scheduler.schedule_ahead`` (the next step planned before this one's tokens are known) against the plain loop:
  the same tokens, finish reasons and free blocks, with the wasted rows of finished sequences dropped;
* ``LLMEngine(async_scheduling=True)`` against the plain engine: the same tokens, text, finish reasons, logprobs
  and token counts, for streamed and ``final_only`` requests, stop strings, ``n > 1``, penalties, ``min_tokens``,
  seeded sampling, preemption, prefix hits and aborts in flight; and no KV block left behind.
"""

import json
import random
import time

import numpy as np
import pytest
import torch

from bench.models import TINY
from minivllm.engine import LLMEngine
from minivllm.learner import WORKLOAD_EOS, Workload, random_workload, workload_token
from minivllm.sampling_params import SamplingParams
from minivllm.scheduler import Scheduler
from minivllm.tokenizer import Tokenizer

FIELDS = ("input_ids", "positions", "slot_mapping", "cu_seqlens_q", "seq_lens", "sample_indices", "preempted",
          "finished")


class PlanOnly(Scheduler):
    """The package's policy with the fast path off: overriding ``plan`` turns it off (as a learner's policy does)."""

    def plan(self):
        return super().plan()


def decode_heavy_workload(seed: int) -> Workload:
    """Few requests that decode for many steps (so the fast path runs, crossing blocks), some with stop tokens'
    stand-in (EOS every few tokens: ``workload_token``), a KV pool that may run short."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    requests = []
    for k in range(rng.randint(2, 7)):
        prompt = [30 + k] * rng.randint(1, 3 * bs)
        max_tokens = rng.choice([None, 3, 17, 40, 64]) if k else 64
        requests.append((rng.randint(0, 10), k, tuple(prompt), max_tokens))
    need = max(len(p) + (m - 1 if m else 64) for _, _, p, m in requests)
    num_blocks = -(-need // bs) + rng.choice([0, 2, 8, 200])
    return Workload(bs, num_blocks, rng.randint(8, 40), rng.randint(2, 6), rng.random() < 0.5, tuple(requests))


def plans(a, b):
    """Each field of two SchedulerOutputs, as lists (the fast path's are numpy arrays)."""
    for name in FIELDS:
        yield name, list(np.asarray(getattr(a, name)).tolist()), list(np.asarray(getattr(b, name)).tolist())


def run_side_by_side(workload: Workload, seed: int, abort_rate: float = 0.0) -> int:
    """The package's scheduler and ``PlanOnly`` on copies of ``workload``; asserts every plan and outcome match.
    Returns how many steps took the fast path."""
    fast, full = workload.scheduler(), workload.scheduler()
    full.__class__ = PlanOnly
    pending = list(zip(workload.sequences(), workload.sequences()))
    rng, fast_steps = random.Random(seed), 0
    for step in range(3000):
        while pending and pending[0][0][0] <= step:
            (_, s), (_, t) = pending.pop(0)
            fast.add(s)
            full.add(t)
        if not fast.has_unfinished():
            assert not full.has_unfinished()
            if not pending:
                return fast_steps
            continue
        if abort_rate and fast.running and rng.random() < abort_rate:  # an abort between two steps
            k = rng.randrange(len(fast.running))
            victim = fast.running[k].seq_id
            fast.abort(victim)
            full.abort(victim)
        a, b = fast.schedule(), full.schedule()
        fast_steps += a.decode_batch is not None
        assert b.decode_batch is None, "a scheduler whose plan() is overridden took the fast path"
        for name, x, y in plans(a, b):
            assert x == y, f"step {step}: {name} {x} != {y}"
        assert [(e.seq.seq_id, e.num_new_tokens, e.start, e.is_prefill, e.needs_sample) for e in a.scheduled] == \
               [(e.seq.seq_id, e.num_new_tokens, e.start, e.is_prefill, e.needs_sample) for e in b.scheduled]
        assert [list(t) for t in a.block_tables] == [list(t) for t in b.block_tables]
        tokens = [workload_token(s) for s in a.sampled_seqs]
        done_a, done_b = fast.postprocess(a, tokens), full.postprocess(b, tokens)
        assert [(s.seq_id, s.finish_reason, s.stop_reason) for s in done_a] == \
               [(s.seq_id, s.finish_reason, s.stop_reason) for s in done_b]
        for name in ("running", "waiting"):
            assert [s.seq_id for s in getattr(fast, name)] == [s.seq_id for s in getattr(full, name)]
        assert [(s.num_computed_tokens, s.output_token_ids) for s in fast.running] == \
               [(s.num_computed_tokens, s.output_token_ids) for s in full.running]
        assert fast.num_blocks_used == full.num_blocks_used
    raise AssertionError("the workload did not finish")


@pytest.mark.parametrize("seed", range(60))
def test_fast_path_plans_what_plan_plans(seed):
    fast_steps = run_side_by_side(decode_heavy_workload(seed), seed, abort_rate=0.05 if seed % 3 == 0 else 0.0)
    run_side_by_side(random_workload(seed), seed)  # the schedule check's workloads: pressure, ties, tiny budgets
    if seed % 10 == 0:
        assert fast_steps > 0  # the comparison above is not vacuous


def test_fast_path_is_taken_for_most_steady_steps():
    w = Workload(4, 500, 64, 8, False, tuple((0, k, (7,) * (5 + k), 50) for k in range(8)))
    sched = w.scheduler()
    for _, s in w.sequences():
        sched.add(s)
    kinds = []
    while sched.has_unfinished():
        out = sched.schedule()
        kinds.append(out.decode_batch is not None)
        sched.postprocess(out, [1] * len(out.sample_indices))  # never EOS: all run to max_tokens
    assert sum(kinds) >= len(kinds) - 3, kinds  # the first steps prefill and start the batch; then all fast


def started(w: Workload):
    """A scheduler for ``w`` with all its sequences added (all arrive at once); returns (scheduler, sequences)."""
    sched, seqs = w.scheduler(), [s for _, s in w.sequences()]
    for s in seqs:
        sched.add(s)
    return sched, seqs


def test_an_eos_among_the_fast_rows_ends_only_that_sequence():
    sched, seqs = started(Workload(4, 500, 64, 8, False, tuple((0, k, (7,) * 3, 20) for k in range(4))))
    for step in range(6):
        out = sched.schedule()
        sched.postprocess(out, [WORKLOAD_EOS if (step == 4 and e.seq is seqs[2]) else 5 for e in out.scheduled])
    assert out.decode_batch is not None  # the EOS came in a fast step
    assert seqs[2].is_finished and seqs[2].finish_reason.value == "stop"
    assert seqs[2].output_token_ids[-1] == WORKLOAD_EOS
    assert all(not s.is_finished for i, s in enumerate(seqs) if i != 2)
    out = sched.schedule()  # the batch without it
    assert [e.seq for e in out.scheduled] == [seqs[0], seqs[1], seqs[3]] and out.decode_batch is not None


def loop_ahead(workload: Workload) -> tuple[dict[int, tuple], int]:
    """The engine's overlapped loop at the scheduler's level: step N+1 planned ahead before N is post-processed,
    its input tokens taken from N's sampled rows (``pending_inputs``). Checks that each row planned ahead was fed
    its own sequence's latest token, and that no block is left behind."""
    sched = workload.scheduler()
    pending = workload.sequences()
    seqs = {s.seq_id: s for _, s in pending}
    inflight, ahead_steps = None, 0
    for step in range(3000):
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[1])
        if inflight is None:
            if not sched.has_unfinished():
                if not pending:
                    break
                continue
            inflight = (sched.schedule(), None)
        plan, fed = inflight
        if fed is not None:  # planned ahead: each live row was fed its sequence's latest token
            for e, token in zip(plan.scheduled, fed):
                if e.seq.status.value == "running":
                    assert token == e.seq.output_token_ids[-1]
                    assert e.start == e.seq.num_computed_tokens == e.seq.num_tokens - 1
        # "sample" N: the token the plain loop gets (a function of the sequence after N-1's token)
        tokens = [workload_token(s) if s.status.value == "running" else -5 for s in plan.sampled_seqs]
        ahead = sched.schedule_ahead(plan)
        if ahead is not None:
            ahead_steps += 1
            assert (ahead.input_ids == -1).all()
            inflight = (ahead, [tokens[i] for i in ahead.pending_inputs.tolist()])
        else:
            inflight = None
        sched.postprocess(plan, tokens)
    assert not sched.has_unfinished() and inflight is None
    assert sched.allocator.num_free + (sched.cache.evictable_blocks if sched.cache else 0) == sched.allocator.num_blocks
    return {i: (s.output_token_ids, s.finish_reason, s.stop_reason) for i, s in seqs.items()}, ahead_steps


def loop_plain(workload: Workload) -> dict[int, tuple]:
    sched = workload.scheduler()
    pending = workload.sequences()
    seqs = {s.seq_id: s for _, s in pending}
    for step in range(3000):
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[1])
        if not sched.has_unfinished() and not pending:
            break
        plan = sched.schedule()
        sched.postprocess(plan, [workload_token(s) for s in plan.sampled_seqs])
    return {i: (s.output_token_ids, s.finish_reason, s.stop_reason) for i, s in seqs.items()}


@pytest.mark.parametrize("seed", range(40))
def test_planning_ahead_gives_the_plain_loops_sequences(seed):
    w = decode_heavy_workload(seed)
    ahead, ahead_steps = loop_ahead(w)
    assert ahead == loop_plain(w)
    if seed % 10 == 0:
        assert ahead_steps > 0


def test_a_step_planned_ahead_reads_each_sequences_latest_token():
    """Row i of the step planned ahead is fed row ``pending_inputs[i]`` of the step before: that row's sequence."""
    sched, seqs = started(Workload(4, 500, 64, 8, False, tuple((0, k, (7,) * 3, 30) for k in range(5))))
    plan = sched.schedule()
    sched.postprocess(plan, [1] * 5)
    plan = sched.schedule()  # a full-path decode step: the batch starts here
    sched.postprocess(plan, [2, WORKLOAD_EOS, 2, 2, 2])  # seqs[1] ends
    assert seqs[1].is_finished
    plan = sched.schedule()
    ahead = sched.schedule_ahead(plan)
    assert [e.seq for e in plan.scheduled] == [seqs[0], seqs[2], seqs[3], seqs[4]]
    assert [e.seq for e in ahead.scheduled] == [e.seq for e in plan.scheduled]
    assert ahead.pending_inputs.tolist() == [0, 1, 2, 3]
    assert [e.start for e in ahead.scheduled] == [e.start + 1 for e in plan.scheduled]
    sched.postprocess(plan, [3, 3, WORKLOAD_EOS, 3])  # N's token ends seqs[3]: N+1's row for it is wasted
    assert seqs[3].is_finished
    n_before = seqs[0].num_output_tokens
    sched.postprocess(ahead, [4, 4, 4, 4])
    assert ahead.dropped == 1 and seqs[3].output_token_ids == [1, 2, WORKLOAD_EOS]
    assert seqs[0].num_output_tokens == n_before + 1
    after = sched.schedule_ahead(ahead)  # not until it is planned from the latest step: ahead was post-processed
    assert after is None
    nxt = sched.schedule()
    assert [e.seq for e in nxt.scheduled] == [seqs[0], seqs[2], seqs[4]] and nxt.input_ids.tolist() == [4, 4, 4]


# ----------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_name("cl100k_base")


def engine(tokenizer, overlap: bool, device: str = "cpu", **kwargs) -> LLMEngine:
    e = LLMEngine(model=TINY, device=device, dtype="float32", max_model_len=256, async_scheduling=overlap,
                  **{"max_num_seqs": 6, **kwargs})  # NOTE: fp32 on a GPU too: the wasted rows change batch
    #                                                  shapes, and bf16 matmuls may round a row differently
    e.tokenizer = e.processor.tokenizer = e.inputs.tokenizer = tokenizer  # the random model has none: lend one
    # NOTE: weights ~N(0, 0.3), not the engine's ~N(0, 0.02): those make the tiny model repeat its input token, so
    # a step fed a stale token of its own sequence would still look right; these make every token depend on it
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in e.model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g).mul_(0.3))
    return e


def requests(seed: int, stop_text: dict[int, str] | None = None):
    """Varied requests: greedy, seeded random, penalties, min_tokens, logprobs, stop tokens, n = 2, final_only."""
    rng = random.Random(seed)
    out = []
    for i in range(14):
        prompt = [rng.randrange(1, TINY.vocab_size) for _ in range(rng.randint(3, 70))]
        if i % 4 == 1:
            prompt = out[0][0][:30] + prompt[:5]  # a shared prefix: a radix-cache hit
        kw = dict(max_tokens=rng.randint(1, 45))
        kind = i % 7
        if kind == 1:
            kw |= dict(temperature=0.9, top_p=0.9, seed=100 + i)
        elif kind == 2:
            kw |= dict(temperature=0, presence_penalty=0.5, repetition_penalty=1.2)
        elif kind == 3:
            kw |= dict(temperature=0, min_tokens=min(5, kw["max_tokens"]),
                       stop_token_ids=[rng.randrange(TINY.vocab_size)])
        elif kind == 4:
            kw |= dict(temperature=0, logprobs=3)
        elif kind == 5:
            kw |= dict(temperature=0.8, seed=7 + i, n=2)
        else:
            kw |= dict(temperature=0)
        if stop_text and i in stop_text:
            kw["stop"] = [stop_text[i]]
        out.append((prompt, SamplingParams(**kw), i % 2 == 0))
    return out


def drive(e: LLMEngine, reqs, abort_at: dict[int, int] | None = None) -> dict:
    """Run every request to its end; returns request id -> (per sample: tokens, text, finish, stop, logprobs)."""
    ids = [e.add_request(p, params, final_only=fo) for p, params, fo in reqs]
    streamed: dict[str, list[str]] = {}
    final = {}
    step = 0
    while e.has_unfinished_requests():
        for rid in [r for r, at in (abort_at or {}).items() if at == step]:
            out = e.abort(ids[rid])
            if out is not None:
                final[ids[rid]] = "aborted"
        for out in e.step():
            for c in out.outputs:
                streamed.setdefault((out.request_id, c.index), []).append(c.delta_text)
            if out.finished:
                final[out.request_id] = [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                                          [sorted(d) for d in c.logprobs] if c.logprobs is not None else None)
                                         for c in out.outputs]
                for c in out.outputs:  # a streamed request's deltas add up to its text
                    if not reqs[ids.index(out.request_id)][2]:
                        assert "".join(streamed[(out.request_id, c.index)]) == c.text
        step += 1
    e.check_no_leaks()
    return final


def test_overlapped_engine_gives_the_plain_engines_outputs(tokenizer):
    plain = drive(engine(tokenizer, False), requests(0))
    stop_text = {}
    for i in (0, 3, 6):  # a stop string from the middle of what the plain engine wrote
        text = plain[str(i)][0][1]
        if len(text) > 8:
            stop_text[i] = text[len(text) // 2: len(text) // 2 + 3]
    reqs = requests(0, stop_text)
    plain = drive(engine(tokenizer, False), reqs)
    e, ahead = engine(tokenizer, True), []
    schedule_ahead = e.scheduler.schedule_ahead
    e.scheduler.schedule_ahead = lambda out: ahead.append(schedule_ahead(out)) or ahead[-1]
    overlapped = drive(e, reqs)
    assert overlapped == plain
    assert sum(a is not None for a in ahead) > 20  # steps were planned ahead
    assert any(r[0][2] == "stop" and r[0][3] in stop_text.values() for r in plain.values() if r != "aborted")
    assert any(rec.num_decode_tokens and rec.num_prefill_tokens == 0 for rec in e.step_log)


def test_overlapped_engine_counts_only_tokens_it_keeps(tokenizer):
    """Ends by max_tokens are known ahead: no wasted row, the plain loop's very tokens. An end by a stop token is
    not: one wasted row each, computed but neither kept nor counted."""
    rng = random.Random(9)
    reqs = [([rng.randrange(1, TINY.vocab_size) for _ in range(4 + 5 * i)],
             SamplingParams(temperature=0, max_tokens=10 + 3 * i), True) for i in range(5)]
    a, b = engine(tokenizer, False), engine(tokenizer, True)
    first = drive(a, reqs)
    assert drive(b, reqs) == first
    assert a.stats == b.stats and a.stats["generation_tokens"] == sum(10 + 3 * i for i in range(5))
    assert sum(r.num_decode_tokens for r in b.step_log) == sum(r.num_decode_tokens for r in a.step_log)
    stops = []
    for i, (p, params, fo) in enumerate(reqs):  # each ends early, on a token it first writes after a few others
        out = first[str(i)][0][0]
        k = next((k for k in range(2, len(out)) if out[k] not in out[:k]), None)
        stops.append((p, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[out[k]]) if k else params, fo))
    assert sum(s.stop_token_ids != () for _, s, _ in stops) >= 2
    a, b = engine(tokenizer, False), engine(tokenizer, True)
    ended = drive(a, stops)
    assert drive(b, stops) == ended and sum(out[0][2] == "stop" for out in ended.values()) >= 2
    assert a.stats == b.stats
    assert sum(r.num_decode_tokens for r in b.step_log) > sum(r.num_decode_tokens for r in a.step_log)  # wasted


def test_overlapped_engine_with_chunked_prefill(tokenizer):
    """A small token budget: steps of prompt chunks that sample nothing, mixed with decodes."""
    reqs = requests(3)
    plain = drive(engine(tokenizer, False, max_num_batched_tokens=16), reqs)
    assert drive(engine(tokenizer, True, max_num_batched_tokens=16), reqs) == plain


@pytest.mark.parametrize("blocks", [None, 12])
def test_overlapped_engine_under_preemption_and_aborts(tokenizer, blocks):
    reqs = [(p, params, fo) for p, params, fo in requests(1) if params.n == 1][:8]
    abort_at = {2: 5, 5: 9, 7: 30}
    kw = {"num_kv_blocks": blocks, "block_size": 8} if blocks else {}
    plain_engine, overlapped_engine = engine(tokenizer, False, **kw), engine(tokenizer, True, **kw)
    plain = drive(plain_engine, reqs, abort_at)
    overlapped = drive(overlapped_engine, reqs, abort_at)
    # an abort lands one step later in the overlapped loop's reports, so compare the requests nobody aborted
    for rid in set(plain) | set(overlapped):
        if int(rid) not in abort_at:
            assert overlapped[rid] == plain[rid]
    if blocks:
        assert plain_engine.scheduler.num_preemptions > 0 and overlapped_engine.scheduler.num_preemptions > 0


def test_the_fast_path_and_the_full_plan_give_the_same_engine_outputs(tokenizer, monkeypatch):
    reqs = requests(2)
    fast_engine, fast_steps = engine(tokenizer, False), []
    schedule = fast_engine.scheduler.schedule

    def recorded():
        out = schedule()
        fast_steps.append(out.decode_batch is not None)
        return out
    monkeypatch.setattr(fast_engine.scheduler, "schedule", recorded)
    fast = drive(fast_engine, reqs)
    slow_engine = engine(tokenizer, False)
    monkeypatch.setattr(slow_engine.scheduler, "_next_decode_step", lambda: None)
    assert drive(slow_engine, reqs) == fast
    assert sum(fast_steps) > 10  # the fast path ran


def greedy_requests(seed: int, n: int = 8):
    rng = random.Random(seed)
    return [([rng.randrange(TINY.vocab_size) for _ in range(rng.randint(3, 30))],
             SamplingParams(temperature=0, max_tokens=rng.randint(5, 40)), False) for _ in range(n)]


def drive_retrying(e: LLMEngine, reqs) -> tuple[dict, int]:
    """Run every request to its end, calling ``step`` again after one that raised (as the server does); returns
    request id -> tokens, and how many steps raised."""
    for p, params, _ in reqs:
        e.add_request(p, params)
    final, failures = {}, 0
    while e.has_unfinished_requests():
        try:
            outs = e.step()
        except RuntimeError:
            failures += 1
            continue
        final |= {o.request_id: o.outputs[0].token_ids for o in outs if o.finished}
    e.check_no_leaks()
    return final, failures


@pytest.mark.parametrize("where", [("runner", "prepare"), ("runner", "launch"), ("engine", "sample_tensors"),
                                   ("scheduler", "schedule_ahead"), ("scheduler", "postprocess"),
                                   ("processor", "process")])
def test_a_step_that_raises_is_safe_to_retry_in_the_overlapped_loop(tokenizer, where):
    """The server calls ``step`` again after one raised (``minivllm.server.async_engine``). A failure anywhere in an
    overlapped step -- the 3rd or 15th call of each piece, with a step planned ahead in flight or not -- leaves the
    engine where a retry gives the plain engine's tokens and no KV block behind. (Until the loop dropped the step
    ahead when this step's post-processing raised, the retry ran that step on tokens it never appended.)"""
    reqs = greedy_requests(3)
    want, _ = drive_retrying(engine(tokenizer, False), reqs)
    for at in (3, 15):
        e = engine(tokenizer, True)
        target = {"runner": e.runner, "scheduler": e.scheduler, "engine": e, "processor": e.processor}[where[0]]
        fn, calls = getattr(target, where[1]), []

        def fail_once(*args, fn=fn, calls=calls, at=at, **kwargs):
            calls.append(1)
            if len(calls) == at:
                raise RuntimeError("injected")
            return fn(*args, **kwargs)

        setattr(target, where[1], fail_once)
        got, failures = drive_retrying(e, reqs)
        assert failures == 1 and got == want, (where, at)


def test_async_scheduling_is_refused_with_tensor_parallelism():
    from minivllm.config import EngineConfig

    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(model=TINY, device="cpu", async_scheduling=True, tensor_parallel_size=2)


def test_async_scheduling_defaults_to_on_for_one_gpu_only():
    """None (the default) resolves to the overlapped loop on one GPU, as vLLM's async scheduling does, and to the
    plain loop on a CPU, with tensor parallelism and for a learner's engine; True and False are kept as given."""
    from minivllm.config import EngineConfig

    assert EngineConfig(model=TINY, device="cpu").async_scheduling is None
    assert EngineConfig(model=TINY, device="cpu").overlaps is False
    assert EngineConfig(model=TINY, device="cpu", async_scheduling=True).overlaps is True
    with pytest.raises(ValueError, match="async_scheduling must be True, False or None"):
        EngineConfig(model=TINY, device="cpu", async_scheduling="yes")

    def on_a_gpu(**kwargs) -> EngineConfig:  # built on the CPU (no GPU here), then pointed at one: what overlaps reads
        config = EngineConfig(model=TINY, device="cpu", **kwargs)
        object.__setattr__(config, "device", "cuda")  # a frozen dataclass: past its checks, which need a GPU
        return config

    assert on_a_gpu().overlaps is True
    assert on_a_gpu(async_scheduling=False).overlaps is False
    assert on_a_gpu(learner=True).overlaps is False
    assert on_a_gpu(tensor_parallel_size=2).overlaps is False
    e = LLMEngine(model=TINY, device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=8)
    assert e.overlap is False  # the engine follows the resolved choice


def test_a_selected_sampling_batch_samples_what_a_rebuilt_one_does():
    """``SamplingBatch.select`` (the rows of sequences still running) against ``from_requests`` of those rows."""
    from minivllm.sampler import Sampler, SamplingBatch, make_generator

    kinds = [dict(temperature=0), dict(temperature=0.7, top_k=5), dict(temperature=1.0, top_p=0.8, seed=3),
             dict(temperature=0.9, min_p=0.1), dict(temperature=0, logprobs=2), dict(temperature=1.2, seed=11)]
    params = [SamplingParams(**kinds[i % len(kinds)]) for i in range(13)]
    keep = [0, 2, 3, 4, 5, 8, 11, 12]  # rows 6 and 10 (and others) finished
    logits = torch.randn(13, 50, generator=torch.Generator().manual_seed(0))

    def gens(ps):
        return [make_generator(p.seed) if p.seed is not None else None for p in ps]
    full = SamplingBatch.from_requests(params, generators=gens(params))
    picked = full.select(keep)
    rebuilt = SamplingBatch.from_requests([params[i] for i in keep], generators=gens([params[i] for i in keep]))
    assert sorted(picked.generators) == sorted(rebuilt.generators)
    for _ in range(3):
        a = Sampler(torch.Generator().manual_seed(5))(logits[keep], picked)
        b = Sampler(torch.Generator().manual_seed(5))(logits[keep], rebuilt)
        assert torch.equal(a.token_ids, b.token_ids)
        assert torch.equal(a.logprobs.token_ids[:, :3], b.logprobs.token_ids[:, :3])
    penalized = SamplingBatch.from_requests([SamplingParams(presence_penalty=0.5)] * 2)
    with pytest.raises(ValueError, match="rebuilt"):
        penalized.select([0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("eager", [False, True])
def test_overlapped_engine_on_a_gpu(tokenizer, eager):
    """On the GPU: CUDA graphs (or eager), pinned copies behind an event, input tokens gathered on the device."""
    reqs = [(p, params, fo) for p, params, fo in requests(4) if params.n == 1]
    kw = dict(device="cuda", enforce_eager=eager, num_kv_blocks=512)  # a fixed pool: the two engines live at once,
    #                                      and with a fraction of the GPU the second gets only what the first left free
    plain = drive(engine(tokenizer, False, **kw), reqs, {3: 6})
    e, ahead = engine(tokenizer, True, **kw), []
    schedule_ahead = e.scheduler.schedule_ahead
    e.scheduler.schedule_ahead = lambda out: ahead.append(schedule_ahead(out)) or ahead[-1]
    overlapped = drive(e, reqs, {3: 6})
    assert {r: v for r, v in overlapped.items() if r != "3"} == {r: v for r, v in plain.items() if r != "3"}
    assert sum(a is not None for a in ahead) > 10


def test_the_server_streams_the_same_text_with_the_overlapped_loop(tokenizer):
    """The OpenAI server over an overlapped engine: streamed and whole completions equal the plain engine's, a
    client that leaves mid-stream frees its blocks, and the engine thread keeps serving."""
    import httpx

    from minivllm.server import ServerThread, build_app

    e = engine(tokenizer, False, max_num_seqs=8)
    prompts = [[(7 * i + j) % TINY.vocab_size for j in range(5 + 3 * i)] for i in range(6)]  # token ids: the
    #                                                                     tiny model's vocabulary is cl100k's first 512
    body = dict(model="random-weights", max_tokens=20, temperature=0)
    answers = {}
    app = build_app(e, model_name="random-weights")
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for overlapped in (False, True):
            e.overlap = overlapped
            whole = [http.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"]
                     for p in prompts]
            streamed = []
            for p in prompts[:2]:
                with http.stream("POST", "/v1/completions", json={**body, "prompt": p, "stream": True}) as r:
                    text = ""
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                    streamed.append(text)
            with http.stream("POST", "/v1/completions", json={**body, "prompt": prompts[3], "stream": True,
                                                              "max_tokens": 200}) as r:
                next(r.iter_lines())  # the first chunk, then hang up
            answers[overlapped] = (whole, streamed)
        deadline = time.monotonic() + 30
        while app.state.front.num_in_flight or app.state.front.snapshot.running:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert answers[True] == answers[False] and answers[True][1] == answers[True][0][:2]
    e.check_no_leaks()


def test_switching_the_overlap_off_mid_run_finishes_the_step_in_flight(tokenizer):
    reqs = [(p, params, fo) for p, params, fo in requests(6) if params.n == 1][:6]
    plain = drive(engine(tokenizer, False), reqs)
    e = engine(tokenizer, True)
    switched = []
    step = e.step

    def step_then_switch():
        out = step()
        if len(e.step_log) == 8:  # mid-run, with a decode step in flight
            switched.append(e.loop.in_flight)
            e.overlap = False
        return out
    e.step = step_then_switch
    assert drive(e, reqs) == plain
    assert switched == [True] and not e.loop.in_flight


class ReplayOnCPU:
    """Stands in for a captured CUDA graph on a CPU: ``replay()`` runs the decode forward pass on the runner's static
    buffers and writes its logits where the graph's output lives. So the CPU checks what a GPU replay is given."""

    def __init__(self, runner, b: int) -> None:
        self.runner, self.b = runner, b
        self.replays = 0

    def replay(self) -> None:
        self.runner.static_logits[self.b].copy_(self.runner.static_forward(self.b))
        self.replays += 1


def with_replays(e: LLMEngine, max_batch: int = 8) -> LLMEngine:
    from minivllm.runner import graph_buckets

    r = e.runner
    r.static = r.static_buffers(max_batch)
    r.static_logits = {b: torch.empty(b, TINY.vocab_size) for b in graph_buckets(max_batch)}
    r.graphs = {b: ReplayOnCPU(r, b) for b in graph_buckets(max_batch)}
    r.graph_batch = max_batch
    return e


@pytest.mark.parametrize("overlap", [False, True])
def test_decode_steps_through_the_graph_buffers_give_the_eager_tokens(tokenizer, overlap):
    """The graph path's inputs (padded to a bucket, block tables, slots, input tokens from the device in the
    overlapped loop) checked on a CPU: replays that run the forward pass on the static buffers."""
    reqs = [(p, params, fo) for p, params, fo in requests(7) if params.n == 1][:7]
    kw = dict(max_num_seqs=7, num_kv_blocks=40, block_size=8)  # a full pool: block 0 is in use (padding rows
    #                                                             must store nothing there: slot -1)
    plain = engine(tokenizer, False, **kw)
    eager = drive(plain, reqs, {2: 5})
    e = with_replays(engine(tokenizer, overlap, **kw))
    assert drive(e, reqs, {2: 5}) == eager
    if not overlap:  # the same KV everywhere: a padding row that stored its key anywhere would show here (the
        #              overlapped loop's wasted rows legitimately write into blocks freed under them)
        torch.testing.assert_close(torch.stack(list(e.kv_cache.kv)), torch.stack(list(plain.kv_cache.kv)),
                                   atol=1e-4, rtol=1e-4)
    assert sum(g.replays for g in e.runner.graphs.values()) > 20 and sum(r.graph for r in e.step_log) > 20
    assert len({b for b, g in e.runner.graphs.items() if g.replays}) >= 3  # several buckets, with padding rows


@pytest.mark.parametrize("overlap", [False, True])
def test_logits_reach_the_sampler_in_the_models_dtype_and_greedy_rows_are_their_argmax(overlap):
    """The runner hands the sampler its logits as the model made them (bf16 here): no float32 copy for an all-greedy
    batch, float32 inside the sampler otherwise (logprobs, a random row), and every greedy token is the argmax."""
    engine = LLMEngine(model=TINY, device="cpu", dtype="bfloat16", max_model_len=64, async_scheduling=overlap)
    seen, sampled = [], []
    sample_tensors = engine.sample_tensors

    def spy(logits, plan):
        out = sample_tensors(logits, plan)
        if logits is not None:
            seen.append(logits.clone())
            sampled.append(out)
        return out

    engine.sample_tensors = spy
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request([3, 1, 4, 1, 5], greedy)
    engine.add_request([9, 2, 6], SamplingParams(temperature=0.8, seed=7, max_tokens=5, ignore_eos=True, logprobs=2))
    while engine.has_unfinished_requests():
        engine.step()
    assert seen and all(logits.dtype == torch.bfloat16 for logits in seen)
    for logits, out in zip(seen, sampled):
        assert out.token_ids[0] == logits[0].float().argmax()  # row 0: the greedy request, every step
        assert out.logprobs is not None and out.logprobs.logprobs.dtype == torch.float32


def test_a_loop_that_keeps_only_the_last_steps_outputs_sees_each_request_finish(tokenizer):
    """``has_unfinished_requests`` turns False with the step that hands back the last finished output, and that step
    retires the overlapped loop's step of wasted rows; the next request runs as on the plain engine."""
    greedy = dict(temperature=0, max_tokens=24)
    plain = engine(tokenizer, False)
    plain.add_request([5, 6, 7], SamplingParams(**greedy))
    ref = []
    while plain.has_unfinished_requests():
        ref += [c.token_ids for out in plain.step() for c in out.outputs if out.finished]
    stop_at = ref[0][5]  # a token the request produces: it ends there (as by EOS), not at max_tokens
    want = ref[0][: ref[0].index(stop_at) + 1]
    e = engine(tokenizer, True)
    for params in (SamplingParams(**greedy, stop_token_ids=[stop_at]), SamplingParams(**greedy)):
        rid = e.add_request([5, 6, 7], params)
        last = []
        while e.has_unfinished_requests():
            last = e.step()
        assert [out.request_id for out in last if out.finished] == [rid]
        assert last[-1].outputs[0].token_ids == (want if params.stop_token_ids else ref[0])
        assert last[-1].outputs[0].finish_reason == ("stop" if params.stop_token_ids else "length")
        assert not e.loop.in_flight  # the step of wasted rows was retired with the last output, not left for later
    e.check_no_leaks()
