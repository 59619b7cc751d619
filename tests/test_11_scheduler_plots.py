"""Phase 11's simulator and pictures (minivllm.course.scheduler_plots): each draws what the log says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402

from minivllm.cache import BlockAllocator  # noqa: E402
from minivllm.course import scheduler_plots as sp  # noqa: E402
from minivllm.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from minivllm.sequence import Sequence  # noqa: E402


def _sched(num_blocks=64, budget=8, max_seqs=4, bs=4):
    return Scheduler(SchedulerConfig(budget, max_seqs, bs), BlockAllocator(num_blocks))


def test_simulate_matches_generation_alone_and_logs_every_step():
    reqs = [(0, Sequence(0, [1, 2, 3], SamplingParams(max_tokens=4))),
            (2, Sequence(1, list(range(10)), SamplingParams(max_tokens=3)))]
    log = sp.simulate(_sched(), reqs)
    for _, seq in reqs:
        ctx, want = list(seq.prompt_token_ids), []
        for _ in range(seq.max_tokens):
            want.append(sp.fake_next_token(ctx))
            ctx.append(want[-1])
        assert seq.output_token_ids == want
    assert [r.step for r in log] == list(range(len(log)))
    assert sum(r.num_tokens for r in log) == (3 + 3) + (10 + 2)  # prompts + decodes after the first token
    assert all(r.num_tokens <= 8 for r in log) and log[-1].used_blocks == 0


def test_simulate_records_prefix_cache_hits_and_preemptions():
    prompt = list(range(12))
    reqs = [(0, Sequence(0, prompt, SamplingParams(max_tokens=2))),
            (5, Sequence(1, prompt + [7], SamplingParams(max_tokens=2)))]
    log = sp.simulate(_sched(budget=16), reqs)
    assert sum(r.cache_hit_tokens for r in log) == 12
    tight = [(0, Sequence(10 + i, [i] * 6, SamplingParams(max_tokens=8))) for i in range(3)]
    log = sp.simulate(_sched(num_blocks=8, budget=32, bs=4), tight)
    assert any(r.preempted for r in log) and max(r.used_blocks + r.cached_blocks for r in log) <= 8


def test_static_batching_pads_to_the_longest_output_and_utilisation_counts_rows():
    log = sp.static_batching([5, 5, 5], [1, 3, 2], batch_size=2)
    assert len(log) == 3 + 2  # batch 1: prefill + 2 decode steps; batch 2: prefill + 1
    assert log[1].decode == {1: 1} and log[1].idle == [0]
    assert sp.utilisation(log, 2) == (2 + 1 + 1 + 1 + 1) / 10


def _colours(ax):
    return [mcolors.to_hex(p.get_facecolor()) for p in ax.patches]


def test_gantt_draws_one_cell_per_sequence_step_coloured_by_kind():
    static = sp.static_batching([5, 5], [1, 3], batch_size=2)
    cont = [sp.StepRecord(0, prefill={0: 5}), sp.StepRecord(1, decode={0: 1}, preempted=[1])]
    fig = sp.gantt([static, cont], ["static", "continuous"])
    a, b = fig.axes
    assert a.get_title() == "static: 3 steps" and b.get_title() == "continuous: 2 steps"
    cols = _colours(a)
    assert cols.count(sp.PREFILL.lower()) == 2 and cols.count(sp.DECODE.lower()) == 2 and cols.count(sp.IDLE.lower()) == 2
    assert len(b.patches) == 2 and [tuple(ln.get_ydata()) for ln in b.get_lines()] == [(1,)]


def test_tokens_per_step_stacks_prefill_on_decode_under_the_budget_line():
    log = [sp.StepRecord(0, prefill={0: 6}), sp.StepRecord(1, decode={0: 1}, prefill={1: 5})]
    ax = sp.tokens_per_step(log, budget=8).axes[0]
    heights = [(round(p.get_y()), round(p.get_height())) for p in ax.patches]
    assert heights == [(0, 0), (0, 1), (0, 6), (1, 5)]
    assert any(ln.get_ydata()[0] == 8 for ln in ax.get_lines())


def test_memory_timeline_marks_preemptions_and_the_pool_size():
    log = [sp.StepRecord(0, used_blocks=3, cached_blocks=1), sp.StepRecord(1, used_blocks=8, preempted=[2])]
    ax = sp.memory_timeline(log, num_blocks=8).axes[0]
    lines = ax.get_lines()
    assert any(ln.get_linestyle() == "--" and ln.get_ydata()[0] == 8 for ln in lines)
    assert any(ln.get_marker() == "x" and list(ln.get_xdata()) == [1] for ln in lines)


def test_exercise_answer_keys_come_from_the_real_scheduler():
    assert sp.budget_split_reference(3, [10, 4], 8) == [1, 1, 1, 5, 0]
    assert sp.budget_split_reference(0, [5], 16) == [5]
    assert sp.budget_split_reference(1, [30, 2, 2], 20) == [1, 19, 0, 0]
    # a fully cached prompt still computes its last token: at most num_tokens - 1, in whole blocks
    assert [sp.cached_tokens_reference(n, 4) for n in (1, 4, 5, 8, 9)] == [0, 0, 4, 4, 8]
    assert sp.cached_tokens_reference(33, 16) == 32 and sp.cached_tokens_reference(32, 16) == 16
