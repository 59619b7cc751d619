"""Phase 12's pictures and helpers: the step loop, timelines from the engine's own ``step_log``, benchmarks.

:func:`step_loop` draws ``LLMEngine.step`` (schedule -> run -> sample -> postprocess). :func:`timeline` draws
engine :class:`~minivllm.outputs.StepRecord` s as a Gantt chart in seconds (one row per sequence);
:func:`as_sim_records` turns them into phase 11's records, so ``scheduler_plots.tokens_per_step`` and
``memory_timeline`` draw them too. :func:`install_scheduler` swaps the engine's scheduler (a policy
subclass, other limits) between runs; :func:`policy_outcome` runs requests under a policy and returns
what a check compares. :func:`throughput`, :func:`latency` and :func:`prefix` plot ``bench/results/12_*``;
:func:`run_profile` a whole GPU run against its floor (``bench.profile_run``); :func:`knockout` a batch-1 step with each
kind of kernel knocked out in turn (``bench.knockout``).
Each plot returns a closed matplotlib ``Figure``. Left out: live (streaming) plots while the engine runs.
"""

import dataclasses
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

from minivllm.course import scheduler_plots as sp
from minivllm.course.plots import provenance
from minivllm.outputs import StepRecord
from minivllm.scheduler import Scheduler

PREFILL, DECODE, PREEMPT = sp.PREFILL, sp.DECODE, sp.PREEMPT
_STAGES = (  # (name, call, what it does, centre)
    ("schedule", "scheduler.schedule()", "who computes which tokens", (2.2, 4.3)),
    ("execute", "runner.execute(plan)", "one forward pass (a CUDA graph for decode)", (9.8, 4.3)),
    ("sample", "self.sample(logits, plan)", "one token per finished prompt / decode", (9.8, 1.2)),
    ("postprocess", "scheduler.postprocess(plan, ids)", "append; EOS, stop ids, length", (6.0, 1.2)),
    ("process", "processor.process(plan, ...)", "text, stop strings, logprobs", (2.2, 1.2)),
)
_HALF_W = 1.75  # half a stage box's width
_ARROWS = (("schedule", "execute", "SchedulerOutput: input_ids, positions,\nslot_mapping, block_tables, sample rows"),
           ("execute", "sample", "logits\n(sampled rows, vocab)"), ("sample", "postprocess", "token ids"),
           ("postprocess", "process", "sequences"), ("process", "schedule", "next step"))


def step_loop() -> Figure:
    """``LLMEngine.step()``: the five moves of every step, what flows between them, requests in and out."""
    fig = plt.figure(figsize=(12, 5.8))
    plt.close(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, 12), ylim=(-0.5, 5.9))
    ax.axis("off")
    colors = (sp.PREFILL, "#8172B3", "#55A868", sp.DECODE, "#937860")
    for (name, call, what, (x, y)), color in zip(_STAGES, colors):
        ax.add_patch(FancyBboxPatch((x - _HALF_W, y - 0.5), 2 * _HALF_W, 1.0, boxstyle="round,pad=0.02,rounding_size=0.15",
                                    facecolor=color, edgecolor=color, gid="stage"))
        ax.text(x, y + 0.18, call, ha="center", va="center", color="white", fontsize=9,
                fontweight="bold", family="monospace")
        ax.text(x, y - 0.2, what, ha="center", va="center", color="white", fontsize=8.5)
    centre = {name: xy for name, _, _, xy in _STAGES}
    for src, dst, label in _ARROWS:
        (x1, y1), (x2, y2) = centre[src], centre[dst]
        if y1 == y2:  # horizontal: leave and enter at the box sides
            start, end = (x1 + _HALF_W * (1 if x2 > x1 else -1), y1), (x2 - _HALF_W * (1 if x2 > x1 else -1), y2)
        else:
            start, end = (x1, y1 + 0.5 * (1 if y2 > y1 else -1)), (x2, y2 - 0.5 * (1 if y2 > y1 else -1))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, lw=1.6, color="#333333",
                                     gid="flow"))
        lift = (0.4 if abs(end[0] - start[0]) > 2 else 0.75) if y1 == y2 else 0  # a short arrow: label above the boxes
        ax.text((start[0] + end[0]) / 2 + (0.15 if x1 == x2 else 0), (start[1] + end[1]) / 2 + lift,
                label, ha="left" if x1 == x2 else "center", va="center", fontsize=8, family="monospace")
    ax.text(6.0, 2.75, "LLMEngine.step()", ha="center", va="center", fontsize=13, fontweight="bold", color="#937860")
    ax.text(6.0, 2.35, "once per iteration, for every request in flight", ha="center", fontsize=9, color="#937860")
    ax.annotate("add_request(prompt, params)\n-> the waiting queue", xy=(1.0, 4.8), xytext=(0.3, 5.35),
                fontsize=8.5, arrowprops=dict(arrowstyle="-|>", color="#4C72B0"), color="#4C72B0")
    ax.annotate("RequestOutput per request that progressed\n(delta_text, delta_token_ids, finished)",
                xy=(1.2, 0.7), xytext=(3.4, -0.3), fontsize=8.5, color="#4C72B0",
                arrowprops=dict(arrowstyle="<|-", color="#4C72B0"))
    return fig


# ----------------------------------------------------------------------------- the engine's step log
def since(engine, mark: int) -> list[StepRecord]:
    """The engine's step records after the first ``mark`` (take ``mark = len(engine.step_log)`` before a run)."""
    return list(engine.step_log)[mark:]


def timeline(logs: Sequence[Sequence[StepRecord]], titles: Sequence[str]) -> Figure:
    """One Gantt panel per log, in seconds from its first step: a row per sequence, a bar per step it computed in
    (prefill chunk or decode), an x where it was preempted. Panels share the time axis."""
    rows = max(len({s for r in log for s, _, _ in r.seqs} | {p for r in log for p in r.preempted}) for log in logs)
    fig, axes = plt.subplots(len(logs), 1, figsize=(10, 1.0 + (0.28 * rows + 0.6) * len(logs)), squeeze=False,
                             sharex=True)
    plt.close(fig)
    for ax, log, title in zip(axes[:, 0], logs, titles):
        ids = sorted({s for r in log for s, _, _ in r.seqs} | {p for r in log for p in r.preempted})
        row = {s: i for i, s in enumerate(ids)}
        t0 = log[0].start if log else 0.0
        for r in log:
            for seq_id, _, is_prefill in r.seqs:
                ax.barh(row[seq_id], r.end - r.start, left=r.start - t0, height=0.8, linewidth=0,
                        color=PREFILL if is_prefill else DECODE)
            for seq_id in r.preempted:
                ax.plot(r.start - t0, row[seq_id], "x", color=PREEMPT, markersize=8, mew=2)
        total = log[-1].end - t0 if log else 0.0
        ax.set_title(f"{title}: {len(log)} steps, {total:.2f} s", fontsize=10)
        ax.set_yticks(range(len(ids)), [str(i) for i in range(len(ids))], fontsize=7)
        ax.set_ylabel("request")
        ax.set_ylim(len(ids) - 0.5, -0.5)
    axes[-1, 0].set_xlabel("seconds since the first step")
    handles = [Patch(color=PREFILL, label="prefill (chunk)"), Patch(color=DECODE, label="decode"),
               plt.Line2D([], [], color=PREEMPT, marker="x", ls="", mew=2, label="preempted")]
    axes[0, 0].legend(handles=handles, loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    return fig


def as_sim_records(log: Sequence[StepRecord]) -> list[sp.StepRecord]:
    """Phase 11's records (step numbers from 0) for ``scheduler_plots``; ``used_blocks`` = every block not free."""
    out = []
    for i, r in enumerate(log):
        rec = sp.StepRecord(i, preempted=list(r.preempted), used_blocks=r.kv_blocks_used,
                            cache_hit_tokens=r.num_cached_prefill_tokens)
        for seq_id, n, is_prefill in r.seqs:
            (rec.prefill if is_prefill else rec.decode)[seq_id] = n
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- policies in the real engine
def install_scheduler(engine, scheduler_cls: type[Scheduler] = Scheduler, **changes) -> Scheduler:
    """Give ``engine`` a new ``scheduler_cls`` over the same KV blocks, its config with ``changes``
    (``SchedulerConfig`` fields, e.g. ``max_num_seqs``). Only between runs: no request may be in flight."""
    if engine.has_unfinished_requests():
        raise RuntimeError("requests are in flight: install a scheduler between runs")
    if changes.get("block_size", engine.scheduler.config.block_size) != engine.scheduler.config.block_size:
        raise ValueError("block_size is fixed by the KV cache's layout")
    old = engine.scheduler
    config = dataclasses.replace(old.config, **changes)
    if old.cache is not None:
        old.cache.evict(old.cache.evictable_blocks)  # start from an empty cache: every block is free
    new = scheduler_cls(config, engine.allocator, eos_token_ids=old.eos_token_ids)
    new.num_steps = old.num_steps
    engine.use_scheduler(new)
    return new


class PolicyOutcome(NamedTuple):
    tokens: list[list[int]]  # each request's output token ids
    victims: list[int]  # request indices in the order they were preempted
    recomputed_tokens: int  # prefill tokens computed beyond the prompts (recomputation after preemption)
    disagreements: int = 0  # victims that differ from the ``reference`` policy's choice in the same state


def policy_outcome(llm, scheduler_cls: type[Scheduler], prompts: Sequence, params, *,
                   reference: type[Scheduler] | None = None, **changes) -> PolicyOutcome:
    """Run ``prompts`` with ``scheduler_cls`` installed (the previous scheduler back after); what happened.

    With ``reference``, every victim choice is also asked of ``reference.select_victim`` on the same running
    sequences, and the choices that differ are counted."""
    engine = llm.engine
    previous, config = type(engine.scheduler), dataclasses.asdict(engine.scheduler.config)
    differ = [0]
    cls = scheduler_cls
    if reference is not None:
        class Compared(scheduler_cls):
            def select_victim(self):
                victim = scheduler_cls.select_victim(self)
                differ[0] += victim is not reference.select_victim(self)
                return victim

        cls = Compared
    install_scheduler(engine, cls, **changes)
    mark, before = len(engine.step_log), engine.stats["prefill_tokens_computed"]
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        install_scheduler(engine, previous, **config)
    log = since(engine, mark)
    first = min(s for r in log for s, _, _ in r.seqs)  # seq ids are given in the order requests were added
    recomputed = engine.stats["prefill_tokens_computed"] - before - sum(len(o.prompt_token_ids) for o in outs)
    return PolicyOutcome([list(o.outputs[0].token_ids) for o in outs],
                         [s - first for r in log for s in r.preempted], recomputed, differ[0])


class CheapestFirst(Scheduler):
    """Preempt the sequence with the fewest tokens (cheapest to recompute),
    the newest among equals."""

    def select_victim(self):
        return min(self.running, key=lambda s: (s.num_tokens, -s.arrival))


# ----------------------------------------------------------------------------- benchmark results
def model_note(result: dict) -> str:
    """What model a benchmark ran: the embedded default model's real weights, or a random model of real shapes."""
    config, dtype = result.get("config", "?"), result.get("dtype", "?")
    if config == "default":
        return f"the embedded SmolLM2-135M-Instruct (real weights), {dtype}"
    return f"{config} shapes with random {dtype} weights (no checkpoint): real speed, meaningless tokens"


def _where(result: dict) -> str:
    meta = result.get("meta", {})
    if meta.get("gpu"):
        return provenance(meta).replace("  ·  ", "\n", 1)
    return f"CPU, {result.get('threads', '?')} threads, {str(meta.get('date', ''))[:10]}\n`{meta.get('command', '')}`"


def _compact(value: float, _pos=None) -> str:
    """A tick label that stays narrow: 1,500 -> "1,500", 133,120 -> "133k", 2,500,000 -> "2.5M"."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.0f}k"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.3g}"


def _few_ticks(ax) -> None:
    """At most ~4 x ticks with compact labels: long numbers side by side overlap in a narrow panel."""
    if ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=3))
        ax.xaxis.set_major_formatter(FuncFormatter(_compact))


def _bars(ax, labels: list[str], values: list[float], fmt: str, colors: Sequence[str]) -> None:
    bars = ax.barh(labels, values, color=colors[: len(values)])
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.3)
    _few_ticks(ax)


def throughput(result: dict) -> Figure:
    """Output tokens/s of the engine and its peers in one ``12_throughput_*`` result, speed-ups in the labels; the
    engine's other runs (another KV cache dtype, ``--kv-cache-dtype auto fp8``; the other loop, ``--both-loops``:
    overlapped where the first ran the plain loop, plain where it overlapped) come right after its first, in the order
    they ran."""
    first = result["minivllm"]["output_tokens_per_s"]
    loop = ", overlapped loop" if result["minivllm"].get("async_scheduling") else ""  # the default on one GPU
    rows = [(f"minivllm (all requests at once{loop})", first, None)]
    for key in (k for k in result if k.startswith("minivllm_") and isinstance(result[k], dict)):  # run order
        rest = key.removeprefix("minivllm_")
        loop = ("plain loop" if rest.endswith("no_async") else "overlapped loop") if rest.endswith("async") else None
        kv = rest.removeprefix("kv_").removesuffix("async").removesuffix("no_").rstrip("_")
        label = ", ".join(([f"{kv} KV cache"] if kv else []) + ([loop] if loop else []))
        rows.append((f"minivllm, {label}", result[key]["output_tokens_per_s"],
                     f"  ({result[key]['output_tokens_per_s'] / first:.2f}x the first)"))
    for key, label in (("transformers", "transformers.generate"), ("llama_cpp", "llama.cpp")):
        peer = result.get(key)
        if peer and "output_tokens_per_s" in peer:  # not a peer that failed ("error") or was left out ("skipped")
            how = "one at a time" if peer.get("batch", 1) == 1 else f"batches of {peer['batch']}"
            rows.append((f"{label} ({how})", peer["output_tokens_per_s"],
                         f"  (minivllm: {first / peer['output_tokens_per_s']:.1f}x)"))
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 2.2))
    plt.close(fig)
    colors = [DECODE] * (1 + sum(r[0].startswith("minivllm,") for r in rows)) + ["#C44E52", "#55A868"]
    bars = ax.barh([r[0] for r in rows], [r[1] for r in rows], color=colors[: len(rows)])
    ax.bar_label(bars, labels=[f"{v:,.0f} tok/s" + (note or "") for _, v, note in rows], padding=3, fontsize=9)
    ax.invert_yaxis()
    ax.set_xscale("log" if rows[0][1] / min(r[1] for r in rows) > 30 else "linear")
    ax.set_xlim(right=max(r[1] for r in rows) * (40 if ax.get_xscale() == "log" else 1.6))  # room for the labels
    if ax.get_xscale() == "linear":
        ax.set_xlim(left=0)
    w = result["workload"]
    ax.set_xlabel("output tokens per second")
    _few_ticks(ax)
    fig.suptitle(f"{w['requests']} requests, {w['output_tokens']:,} output tokens on {result['device']}\n"
                 f"{model_note(result)}\nmeasured on {_where(result)}", fontsize=9)
    fig.tight_layout()
    return fig


RUN_PARTS = (("decode attention", "#4C72B0"), ("matmul (cuBLAS)", "#DD8452"), ("qk-norm+rope+kv store", "#55A868"),
             ("norms", "#8172B3"))  # the rest of the GPU's busy time is one grey segment, its idle time a white one


def run_profile(result: dict) -> Figure:
    """A whole offline run (``bench.profile_run``) as three stacked bars in seconds: the floor (the KV cache's and the
    weights' bytes at the GPU's copy bandwidth), the GPU's busy time by kind of kernel, and the run's span with the
    GPU idle in it."""
    fl, cats = result["floors"], {r["category"]: r["seconds"] for r in result["by_category"]}
    prof = result["profile"]
    rest = prof["busy_s"] - sum(cats.get(name, 0.0) for name, _ in RUN_PARTS)
    rows = [("floor: bytes / bandwidth", [("KV cache reads", fl["kv_floor_s"], "#4C72B0"),
                                          ("weights, once a step", fl["weights_floor_s"], "#DD8452")]),
            ("GPU busy, by kernel", [(name, cats.get(name, 0.0), color) for name, color in RUN_PARTS]
             + [("everything else", rest, "#BBBBBB")]),
            ("the profiled run", [("GPU busy", prof["busy_s"], "#999999"),
                                  ("GPU idle", prof["idle_s"], "#FFFFFF")])]
    fig, ax = plt.subplots(figsize=(9.5, 3.8))
    plt.close(fig)
    for y, (label, parts) in enumerate(rows):
        left = 0.0
        for name, seconds, color in parts:
            ax.barh(y, seconds, left=left, color=color, edgecolor="#444444", linewidth=0.6)
            if seconds > 0.14 * prof["span_s"]:  # room for a label inside; the legend names the rest
                dark = color in ("#4C72B0", "#8172B3", "#55A868")
                ax.text(left + seconds / 2, y, f"{name}\n{seconds:.2f} s", ha="center", va="center", fontsize=7.5,
                        color="white" if dark else "black")
            left += seconds
        ax.text(left + 0.05, y, f"{left:.2f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, prof["span_s"] * 1.15)
    ax.set_xlabel("seconds")
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#444444", label=n) for n, c in RUN_PARTS]
              + [Patch(facecolor="#BBBBBB", edgecolor="#444444", label="other kernels"),
                 Patch(facecolor="#FFFFFF", edgecolor="#444444", label="GPU idle")],
              loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=6, fontsize=7.5, frameon=False)
    attn = cats.get("decode attention", 0.0)
    w = result["workload"]
    fig.suptitle(f"{w['requests']} requests, {w['output_tokens']:,} output tokens: decode attention at "
                 f"{fl['kv_floor_s'] / attn:.0%} of its floor (copy bandwidth {fl['hbm_gbps'] / 1e3:.2f} TB/s)\n"
                 f"measured on {_where(result)}", fontsize=9)
    fig.tight_layout()
    return fig


def latency(result: dict) -> Figure:
    """Decode ms per token at batch 1 and TTFT of a long prompt, per mode (CUDA graphs, attention preparing its own
    inputs switched, the other loop than the default's, programmatic dependent launch or the small-step kernels
    switched off, eager), with targets."""
    modes = [m for m in ("cuda_graphs", "cuda_graphs_decode_prep", "cuda_graphs_no_decode_prep",
                         "cuda_graphs_decode_prep_early", "cuda_graphs_dynamic_split", "cuda_graphs_static_split",
                         "cuda_graphs_no_pdl", "cuda_graphs_async",
                         "cuda_graphs_no_async", "cuda_graphs_l2_prefetch", "cuda_graphs_no_prefetch",
                         "cuda_graphs_unfused", "cuda_graphs_cublas", "decode_graphs_only", "eager") if m in result]
    palette = {"cuda_graphs": DECODE, "cuda_graphs_decode_prep": "#ff9da7", "cuda_graphs_no_decode_prep": "#ff9da7",
               "cuda_graphs_decode_prep_early": "#d37295", "cuda_graphs_dynamic_split": "#8cd17d",
               "cuda_graphs_static_split": "#8cd17d", "cuda_graphs_no_pdl": "#f28e2b",
               "cuda_graphs_async": "#59a14f",
               "cuda_graphs_no_async": "#59a14f", "cuda_graphs_l2_prefetch": "#76b7b2",
               "cuda_graphs_no_prefetch": "#76b7b2", "cuda_graphs_unfused": "#edc948", "cuda_graphs_cublas": "#9c755f",
               "decode_graphs_only": "#b07aa1", "eager": PREFILL}
    targets = result.get("targets") or {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(modes) + 2.2))
    plt.close(fig)
    for ax, key, target, what in ((axes[0], "decode_ms_per_token", targets.get("decode_ms_per_token"),
                                   f"decode, batch 1: ms per token ({result['output_len']} tokens)"),
                                  (axes[1], "ttft_ms", targets.get("ttft_1k_ms"),
                                   f"time to first token, {result['ttft_prompt_len']}-token prompt: ms")):
        _bars(ax, [m.replace("_", " ") for m in modes], [result[m][key] for m in modes], "{:.2f}",
              [palette[m] for m in modes])
        if target:
            ax.axvline(target, color="black", ls="--", lw=1, label=f"target {target}")
            ax.set_xlim(0, max(ax.get_xlim()[1], target * 1.2))
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(what, fontsize=9)
    fig.suptitle(f"{model_note(result)}\n{_where(result)}", fontsize=9)
    fig.tight_layout()
    return fig


KNOCKOUT_LABELS = {"norms": "RMSNorms (2 a layer)", "qkv_proj": "qkv_proj", "qkv_prep": "attention's own prep\n"
                   "(QK-norm, RoPE, KV store)", "attention": "attention, prep included", "o_proj": "o_proj",
                   "gate_up_proj": "gate_up_proj", "down_proj": "SiLU·mul + down_proj"}
_MATMUL_SHAPES = {"qkv_proj": ("hidden_size", "qkv"), "o_proj": ("q", "hidden_size"),
                 "gate_up_proj": ("hidden_size", "gate_up"), "down_proj": ("intermediate_size", "hidden_size")}


def knockout(result: dict, *, layers: int = 28, hidden: int = 1024, q: int = 2048, kv: int = 1024,
             intermediate: int = 3072) -> Figure:
    """``17_knockout_cuda``: what a batch-1 decode step saves when each kind of kernel is knocked out (left), and the
    whole step against the step with no decoder layer at all (right). A matmul's bar carries its floor: its weight
    bytes in all layers over the GPU's copy bandwidth (``meta.hbm_peak_gbps``). Shapes: Qwen3-0.6B's by default."""
    k = result["knockouts"]
    saved = result["saved_ms_per_token"]
    kinds = [kind for kind in KNOCKOUT_LABELS if kind in saved]
    size = {"hidden_size": hidden, "q": q, "qkv": q + 2 * kv, "gate_up": 2 * intermediate,
            "intermediate_size": intermediate}
    gbps = result.get("meta", {}).get("hbm_peak_gbps")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(kinds) + 2.4), width_ratios=(3, 2))
    plt.close(fig)
    colors = ["#76b7b2" if kind in _MATMUL_SHAPES else "#f28e2b" if kind in ("attention", "qkv_prep")
              else "#edc948" for kind in kinds]
    _bars(ax, [KNOCKOUT_LABELS[kind] for kind in kinds], [saved[kind] for kind in kinds], "{:.3f}", colors)
    if gbps:
        for i, kind in enumerate(kinds):
            if kind in _MATMUL_SHAPES:
                rows, cols = (size[n] for n in _MATMUL_SHAPES[kind])
                floor_ms = layers * rows * cols * 2 / (gbps * 1e9) * 1e3
                ax.plot([floor_ms, floor_ms], [i - 0.4, i + 0.4], color="black", lw=2)
        ax.plot([], [], color="black", lw=2, label=f"weights' bytes at {gbps:,.0f} GB/s")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("ms per token saved without it (all layers)")
    ax.set_title("what each kind of kernel costs the step", fontsize=9)
    whole, bare = k["none"]["decode_ms_per_token"], k["layers"]["decode_ms_per_token"]
    _bars(ax2, ["whole step", "no decoder layer\n(embedding, final norm,\nLM head, sampling, host)"], [whole, bare],
          "{:.3f} ms", [DECODE, "#bab0ac"])
    ax2.set_xlabel("ms per token")
    ax2.set_title("the step, with and without its layers", fontsize=9)
    fig.suptitle(f"Batch-1 decode, each kind of kernel knocked out of the CUDA graph in turn\n{_where(result)}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def gemv_prologues(result: dict) -> Figure:
    """``17_gemv_cuda``: at 1 token, each prologue kernel (SiLU·mul or add + RMSNorm folded into the matmul after
    it) against the two launches it replaces, with ``kernels.gemv`` and with cuBLAS for the matmul."""
    cases = [(f"SiLU·mul\n+ down_proj ({r['n']} x {r['k']})", r) for r in result.get("silu", []) if r["tokens"] == 1]
    cases += [(f"add + RMSNorm\n+ {'qkv' if r['n'] == 4096 else 'gate_up'}_proj ({r['n']} x {r['k']})", r)
              for r in result.get("add_norm", []) if r["tokens"] == 1]
    kinds = (("fused_us", "one kernel (prologue folded in)", DECODE), ("two_kernels_us", "two: kernel + kernels.gemv",
             "#b07aa1"), ("with_cublas_us", "two: kernel + cuBLAS", "#C44E52"))
    fig, ax = plt.subplots(figsize=(9, 1.1 * len(cases) + 1.8))
    plt.close(fig)
    height = 0.8 / len(kinds)
    for j, (key, label, color) in enumerate(kinds):
        ys = [i + (j - 1) * height for i in range(len(cases))]
        bars = ax.barh(ys, [r[key] for _, r in cases], height=height, color=color, label=label)
        ax.bar_label(bars, labels=[f"{r[key]:.1f} µs" for _, r in cases], padding=3, fontsize=8)
    ax.set_yticks(range(len(cases)), [name for name, _ in cases], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(r[k] for _, r in cases for k, _, _ in kinds) * 1.3)
    ax.set_xlabel("µs per call, CUDA-graph replay (batch 1: one token)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.suptitle(f"Qwen3-0.6B's decode matmuls with what comes before them\n{_where(result)}", fontsize=9)
    fig.tight_layout()
    return fig


def prefix(result: dict) -> Figure:
    """Prefix caching on a shared prompt: prefill tokens computed and median TTFT, cache off vs on.

    Not counted in either setting: the one warm-up request the benchmark serves first with the same shared
    prompt (it computes the shared prompt once; with the cache on it leaves it cached): the figure says so."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.0))
    plt.close(fig)
    labels = ["cache off", "cache on"]
    for ax, key, what, fmt in ((axes[0], "prefill_tokens_computed", "prefill tokens computed", "{:,.0f}"),
                               (axes[1], "ttft_ms_median", "median time to first token (ms)", "{:,.1f}")):
        _bars(ax, labels, [result["cache_off"][key], result["cache_on"][key]], fmt, (PREFILL, DECODE))
        ax.set_title(what, fontsize=9)
    warm = result["shared_len"] + result["suffix_len"]
    fig.suptitle(f"{result['num_requests']} requests sharing a {result['shared_len']:,}-token prompt "
                 f"(+{result['suffix_len']} own tokens each): {result['prefill_tokens_saved']:.0%} fewer prefill "
                 f"tokens\n{model_note(result)}  ·  {_where(result)}", fontsize=9)
    note = (f"Not counted: a warm-up request with the same shared prompt, served first in both settings ({warm:,} "
            f"prefill tokens). With the cache on, it leaves the shared prompt cached, as a server's earlier requests "
            f"would: then each request computes only its own {result['suffix_len']} tokens.")
    fig.text(0.5, 0.01, textwrap.fill(note, 130), ha="center", va="bottom", fontsize=8, color="#555555", gid="note")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


# ----------------------------------------------------------------------------- the host behind the device
HOST_PHASES = (("schedule", "schedule"), ("inputs", "inputs"), ("sampling_batch", "sampler batch"),
               ("sampler", "sampler"), ("postprocess", "postprocess"), ("process", "outputs, text"))


def overlap_timeline(host_ms: float, device_ms: float, steps: int = 4) -> Figure:
    """Host and device lanes for ``steps`` decode steps, plain loop above, overlapped loop below.

    Plain: the device computes step N, then waits while the host post-processes N and plans N+1. Overlapped: the
    host plans and prepares N+1 while the device computes N; the device waits only when the host is slower."""
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True)
    plt.close(fig)
    colors = [DECODE, PREFILL, "#59a14f", "#b07aa1"]
    for ax, overlapped in ((axes[0], False), (axes[1], True)):
        if overlapped:  # step 1 is planned before anything runs; then the host prepares N+1 while N runs
            ax.barh(1, host_ms, left=0, color=colors[0], alpha=0.5, edgecolor="black", lw=0.5)
        start, host_free = host_ms, host_ms  # when the device starts the step; when the host is free again
        starts = []
        for n in range(steps):
            starts.append(start)
            c = colors[n % len(colors)]
            ax.barh(0, device_ms, left=start, color=c, edgecolor="black", lw=0.5)
            ax.text(start + device_ms / 2, 0, f"step {n + 1}", ha="center", va="center", fontsize=8)
            if not overlapped:  # host: N's outputs after N ran, then N+1's plan; the device waits meanwhile
                ax.barh(1, host_ms, left=start + device_ms, color=c, alpha=0.5, edgecolor="black", lw=0.5)
                start += device_ms + host_ms
            else:  # host: N+1's plan and N's outputs, from when N was launched
                h = max(host_free, start)
                ax.barh(1, host_ms, left=h, color=colors[(n + 1) % len(colors)], alpha=0.5, edgecolor="black", lw=0.5)
                host_free = h + host_ms
                start = max(start + device_ms, host_free)
        ax.set_yticks([0, 1], ["device", "host"])
        per_step = (starts[-1] - starts[0]) / (steps - 1)  # from one step's start to the next
        ax.set_title(("overlapped loop: the host works on step N+1 (and N's outputs) while the device runs N"
                      if overlapped else "plain loop: the device waits while the host post-processes and plans")
                     + f"  ->  {per_step:.1f} ms per step", fontsize=9, loc="left")
        ax.set_ylim(-0.6, 1.6)
    axes[1].set_xlabel(f"ms (illustrative: {host_ms:g} ms of host work and {device_ms:g} ms of device work per step)")
    fig.tight_layout()
    return fig


def host_overhead(result: dict, labels: Sequence[tuple[str, str]], *,
                  where: str = "a tiny random model on one CPU thread") -> Figure:
    """Host milliseconds per decode step, phase by phase (stacked), for the ``bench.host_overhead`` runs named in
    ``labels`` (``(run label, title)``), with the 1 ms target. "other" is the glue between the phases. ``where``:
    what ran the forward passes, for the title."""
    runs = [(result["runs"][key], title) for key, title in labels if key in result["runs"]]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(runs) + 2.2))
    plt.close(fig)
    colors = [DECODE, PREFILL, "#bab0ac", "#59a14f", "#edc948", "#b07aa1", "#e0e0e0"]
    names = [title for _, title in runs]
    left = [0.0] * len(runs)
    phases = [*HOST_PHASES, ("other", "other")]
    for (phase, label), color in zip(phases, colors):
        if phase == "other":
            values = [max(0.0, r["cpu_ms_per_step"]["host"]["median"] - x) for (r, _), x in zip(runs, left)]
        else:
            values = [r["cpu_ms_per_step"][phase]["median"] for r, _ in runs]
        ax.barh(names, values, left=left, color=color, label=label, edgecolor="white", lw=0.5)
        left = [a + b for a, b in zip(left, values)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.2f} ms", va="center", fontsize=9)
    workload = runs[0][0]["workload"] if runs else {}
    batch, context = workload.get("batch", "?"), workload.get("context_mean")
    target = isinstance(batch, int) and batch >= 256  # the 1 ms target is for a step of 256 sequences
    if target:
        ax.axvline(1.0, color="black", ls="--", lw=1, label="target: 1 ms")
    ax.invert_yaxis()
    ax.set_xlim(0, max([*left, 1.0 if target else 0.0]) * 1.15)
    ax.set_xlabel("host CPU ms per decode step (median), the forward pass left out")
    ax.legend(fontsize=8, ncol=4 if len(runs) > 2 else 1, loc="lower right" if len(runs) > 2 else "upper left",
              bbox_to_anchor=None if len(runs) > 2 else (1.01, 1.0))
    contexts = f"~{context:.0f}-token contexts" if isinstance(context, (int, float)) else "contexts as run"
    fig.suptitle(f"Host work per decode step at batch {batch}, {contexts}: `python -m bench.host_overhead`"
                 f"\n({where}: host work depends on the batch, not on the model)",
                 fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    return fig


TARGET_COLORS = {"met": "#59A14F", "missed": "#E15759", "missing": "#BAB0AC"}


def targets(summary: dict) -> Figure:
    """``bench.targets``' table (``17_targets_cuda.json``): each target of the GPU engine as the share of its goal
    reached (a figure over its goal where more is better, the goal over the figure where less is), 1 = exactly on
    target; the bar's label gives the figure itself. Green met, red missed, grey not measured."""
    rows = summary["targets"]
    share = []
    for t in rows:
        f, goal = t["figure"], t["goal"]
        share.append(0.0 if f is None else f / goal if t["higher_is_better"] else goal / f if f else 0.0)
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.8))
    plt.close(fig)
    labels = [textwrap.fill(t["measure"], 46) for t in rows]
    bars = ax.barh(labels, share, color=[TARGET_COLORS[t["status"]] for t in rows])

    def text(t) -> str:
        f = t["figure"]
        if f is None:
            return "not measured"
        value = f"{f:,.0f}" if abs(f) >= 100 else f"{f:.3g}"
        return f"{value} {t['unit']} (goal {'≥' if t['higher_is_better'] else '≤'} {t['goal']:,g})"
    ax.bar_label(bars, labels=[text(t) for t in rows], padding=3, fontsize=8)
    ax.axvline(1.0, color="black", lw=1, ls="--")
    ax.invert_yaxis()
    ax.set_xlim(0, max(share + [1.0]) * 1.6)
    ax.set_xlabel("share of the goal reached (1 = on target)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(handles=[Patch(color=c, label=s) for s, c in TARGET_COLORS.items()], fontsize=8, loc="lower right")
    gpus = ", ".join(summary.get("gpus") or ["?"])
    commits = ", ".join(summary.get("commits") or ["?"])
    run = "one run" if summary.get("one_run") else "NOT one run"
    date = str(summary.get("meta", {}).get("date", ""))[:10]
    fig.suptitle(f"The GPU engine's targets: {summary['met']} met, {summary['missed']} missed, {summary['missing']} "
                 f"not measured\n{gpus}, commit {commits} ({run}), {date}  ·  `python -m bench.targets`", fontsize=9)
    fig.tight_layout()
    return fig
