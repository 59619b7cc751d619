"""Phase 11's simulator and pictures: the scheduler driven by a fake model, drawn step by step.

:class:`FakeModel` stands in for the engine (phase 12): it stores each step's tokens in a dict keyed by KV
slot and "samples" a hash of the context it reads back through the block table, so a wrong slot mapping
or a wrong prefix hit changes the output. :func:`simulate` runs a :class:`~minivllm.scheduler.Scheduler`
over requests that arrive at given steps and returns one :class:`StepRecord` per step;
:func:`static_batching` makes the same records for the old way (fixed batches, padded to the longest).
:func:`gantt` draws records as a Gantt chart, :func:`tokens_per_step` the budget split per step,
:func:`memory_timeline` KV blocks in use with the preemptions. Each returns a closed matplotlib ``Figure``.
"""

from collections.abc import Iterable, Sequence as Seq
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from minivllm.scheduler import Scheduler, SchedulerOutput
from minivllm.sampling_params import SamplingParams
from minivllm.sequence import Sequence

PREFILL, DECODE, IDLE, PREEMPT = "#DD8452", "#4C72B0", "#CCCCCC", "#C44E52"


def fake_next_token(context: Iterable[int], vocab_size: int = 50) -> int:
    """A deterministic "model": the next token is a hash of every token so far."""
    h = 0
    for t in context:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    return h % vocab_size


class FakeModel:
    """Writes input ids into KV slots, reads each sampled sequence's context back through its block table."""

    def __init__(self, block_size: int, vocab_size: int = 50) -> None:
        self.block_size, self.vocab_size, self.kv = block_size, vocab_size, {}

    def __call__(self, out: SchedulerOutput) -> list[int]:
        bs = self.block_size
        for tok, slot in zip(out.input_ids, out.slot_mapping):
            self.kv[slot] = tok
        return [fake_next_token([self.kv[table[p // bs] * bs + p % bs] for p in range(n)], self.vocab_size)
                for e, table, n in zip(out.scheduled, out.block_tables, out.seq_lens) if e.needs_sample]


@dataclass(slots=True)
class StepRecord:
    step: int
    prefill: dict[int, int] = field(default_factory=dict)  # seq id -> prefill tokens computed this step
    decode: dict[int, int] = field(default_factory=dict)  # seq id -> decode tokens (1)
    idle: list[int] = field(default_factory=list)  # seq ids holding a batch slot without work (static batching)
    preempted: list[int] = field(default_factory=list)
    used_blocks: int = 0  # KV blocks held by sequences (not free, not only cached) after the step
    cached_blocks: int = 0  # blocks held by the radix cache after the step
    cache_hit_tokens: int = 0  # prompt tokens admitted from the prefix cache this step

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill.values()) + sum(self.decode.values())


def simulate(scheduler: Scheduler, requests: Seq[tuple[int, Sequence]], model=None,
             max_steps: int = 10_000) -> list[StepRecord]:
    """Add each ``(arrival_step, seq)`` when its step comes, run to the end; one record per step."""
    model = model or FakeModel(scheduler.config.block_size)
    pending = sorted(requests, key=lambda r: r[0])
    log: list[StepRecord] = []
    for step in range(max_steps):
        while pending and pending[0][0] <= step:
            scheduler.add(pending.pop(0)[1])
        if not scheduler.has_unfinished():
            if not pending:
                return log
            log.append(StepRecord(step))
            continue
        out = scheduler.schedule()
        rec = StepRecord(step, preempted=list(out.preempted))
        for e in out.scheduled:
            (rec.prefill if e.is_prefill else rec.decode)[e.seq.seq_id] = e.num_new_tokens
            if e.start == e.seq.num_cached_tokens > 0:  # the first chunk after a prefix-cache hit
                rec.cache_hit_tokens += e.start
        scheduler.postprocess(out, model(out))
        cached = scheduler.cache.cached_blocks if scheduler.cache is not None else 0
        rec.used_blocks, rec.cached_blocks = scheduler.allocator.num_used - cached, cached
        log.append(rec)
    raise RuntimeError(f"the workload did not finish in {max_steps} steps")


def static_batching(prompt_lens: Seq[int], output_lens: Seq[int], batch_size: int) -> list[StepRecord]:
    """Fixed batches in arrival order: one prefill step, then decode until the batch's longest output is done.

    A sequence that finished early keeps its row (idle) until the whole batch ends."""
    log: list[StepRecord] = []
    for first in range(0, len(prompt_lens), batch_size):
        ids = list(range(first, min(first + batch_size, len(prompt_lens))))
        log.append(StepRecord(len(log), prefill={i: prompt_lens[i] for i in ids}))
        for k in range(1, max(output_lens[i] for i in ids)):  # the prefill step samples the first token
            rec = StepRecord(len(log))
            for i in ids:
                if k < output_lens[i]:
                    rec.decode[i] = 1
                else:
                    rec.idle.append(i)
            log.append(rec)
    return log


def utilisation(log: Seq[StepRecord], batch_size: int) -> float:
    """The share of the ``batch_size`` rows of each step that did useful work (a decode or a prefill)."""
    busy = sum(len(r.prefill) + len(r.decode) for r in log)
    return busy / (batch_size * len(log)) if log else 0.0


def gantt(logs: Seq[Seq[StepRecord]], titles: Seq[str], num_seqs: int | None = None) -> Figure:
    """One row per sequence, one cell per step: prefill, decode, idle (padding) or preempted."""
    fig, axes = plt.subplots(len(logs), 1, figsize=(10, 1.2 + 0.3 * (num_seqs or 8) * len(logs)),
                             squeeze=False, sharex=True)
    for ax, log, title in zip(axes[:, 0], logs, titles):
        for rec in log:
            for colour, ids in ((PREFILL, rec.prefill), (DECODE, rec.decode), (IDLE, rec.idle)):
                for i in ids:
                    ax.barh(i, 1, left=rec.step, color=colour, edgecolor="white", linewidth=0.3)
            for i in rec.preempted:
                ax.plot(rec.step + 0.5, i, "x", color=PREEMPT, markersize=8, mew=2)
        ax.set_title(f"{title}: {len(log)} steps")
        ax.set_ylabel("sequence")
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel("step")
    handles = [Patch(color=PREFILL, label="prefill"), Patch(color=DECODE, label="decode"),
               Patch(color=IDLE, label="idle (padding)")]
    handles.append(plt.Line2D([], [], color=PREEMPT, marker="x", ls="", mew=2, label="preempted"))
    axes[0, 0].legend(handles=handles, loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    plt.close(fig)
    return fig


def tokens_per_step(log: Seq[StepRecord], budget: int, title: str = "tokens per step") -> Figure:
    """Stacked bars: decode tokens (bottom) and prefill tokens (top) of each step, and the budget line."""
    fig, ax = plt.subplots(figsize=(10, 3))
    steps = [r.step for r in log]
    dec = [sum(r.decode.values()) for r in log]
    pre = [sum(r.prefill.values()) for r in log]
    ax.bar(steps, dec, color=DECODE, label="decode", width=0.9)
    ax.bar(steps, pre, bottom=dec, color=PREFILL, label="prefill chunk", width=0.9)
    ax.axhline(budget, color="black", ls="--", lw=1, label="max_num_batched_tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    plt.close(fig)
    return fig


def memory_timeline(log: Seq[StepRecord], num_blocks: int, title: str = "KV blocks") -> Figure:
    """KV blocks held by sequences and by the cache per step, the pool size, and the preemptions."""
    fig, ax = plt.subplots(figsize=(10, 3))
    steps = [r.step for r in log]
    used = [r.used_blocks for r in log]
    ax.stackplot(steps, used, [r.cached_blocks for r in log], colors=[DECODE, IDLE],
                 labels=["held by sequences", "held by the radix cache"])
    ax.axhline(num_blocks, color="black", ls="--", lw=1, label="pool size")
    pre = [(r.step, r.used_blocks) for r in log if r.preempted]
    if pre:
        ax.plot(*zip(*pre), "x", color=PREEMPT, mew=2, label="preemption")
    ax.set_xlabel("step")
    ax.set_ylabel("blocks")
    ax.set_ylim(0, num_blocks * 1.15)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- exercise answer keys
def budget_split_reference(num_decodes: int, prefill_remaining: Seq[int], budget: int) -> list[int]:
    """Ask the real :class:`Scheduler`: the tokens each of ``num_decodes`` decodes and each new prompt gets
    (``budget`` must be at least the number of sequences, as :class:`SchedulerConfig` requires)."""
    from minivllm.cache import BlockAllocator  # noqa: PLC0415 (keeps the module's import light)
    from minivllm.scheduler import SchedulerConfig  # noqa: PLC0415

    n = num_decodes + len(prefill_remaining)
    sched = Scheduler(SchedulerConfig(budget, max(n, 1), 4, enable_prefix_caching=False), BlockAllocator(1024))
    model = FakeModel(4)
    for i in range(num_decodes):  # 1-token prompts: one step makes them decodes
        sched.add(Sequence(i, [i]))
    if num_decodes:
        out = sched.schedule()
        sched.postprocess(out, model(out))
    for j, r in enumerate(prefill_remaining):
        sched.add(Sequence(num_decodes + j, list(range(r)), SamplingParams(max_tokens=1)))
    got = {e.seq.seq_id: e.num_new_tokens for e in sched.schedule().scheduled}
    return [got.get(i, 0) for i in range(n)]


def cached_tokens_reference(num_tokens: int, block_size: int) -> int:
    """Ask the real :class:`Scheduler`: a prompt of ``num_tokens`` is computed and cached, then admitted again;
    how many of its tokens does the prefix cache serve the second time?"""
    from minivllm.cache import BlockAllocator  # noqa: PLC0415
    from minivllm.scheduler import SchedulerConfig  # noqa: PLC0415

    sched = Scheduler(SchedulerConfig(4 * num_tokens + 4, 1, block_size), BlockAllocator(4 * num_tokens + 4))
    prompt = [7] * num_tokens
    first, again = Sequence(0, prompt, SamplingParams(max_tokens=1)), Sequence(1, prompt, SamplingParams(max_tokens=1))
    simulate(sched, [(0, first), (1, again)])
    return again.num_cached_tokens
