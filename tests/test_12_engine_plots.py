"""Phase 12's pictures and policy helpers (minivllm.course.engine_plots): each draws what the log says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import pytest  # noqa: E402

from minivllm.course import engine_plots as ep  # noqa: E402
from minivllm.llm import LLM  # noqa: E402
from minivllm.model.config import ModelConfig  # noqa: E402
from minivllm.outputs import StepRecord  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402
from minivllm.scheduler import Scheduler  # noqa: E402

TINY = ModelConfig(architecture="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512, qk_norm=True)


def _rec(step, start, seqs, preempted=()):
    return StepRecord(step=step, start=start, end=start + 0.5, num_decode_tokens=sum(n for _, n, p in seqs if not p),
                      num_prefill_tokens=sum(n for _, n, p in seqs if p), num_cached_prefill_tokens=0, seqs=list(seqs),
                      preempted=list(preempted), num_running=len(seqs), num_waiting=0, kv_blocks_used=3, graph=False)


@pytest.fixture(scope="module")
def llm():
    return LLM(TINY, device="cpu", num_kv_blocks=12, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)


def test_step_loop_draws_five_stages_joined_in_a_cycle():
    ax = ep.step_loop().axes[0]
    assert len([p for p in ax.patches if p.get_gid() == "stage"]) == 5
    assert len([p for p in ax.patches if p.get_gid() == "flow"]) == 5
    assert any("LLMEngine.step()" in t.get_text() for t in ax.texts)


def test_timeline_puts_each_step_at_its_time_on_its_sequences_row():
    log = [_rec(1, 10.0, [(7, 5, True)]), _rec(2, 10.5, [(7, 1, False), (9, 3, True)]),
           _rec(3, 11.0, [(9, 1, False)], preempted=[7])]
    ax = ep.timeline([log], ["run"]).axes[0]
    bars = [(round(p.get_x(), 2), round(p.get_y() + p.get_height() / 2), mcolors.to_hex(p.get_facecolor()))
            for p in ax.patches]
    assert bars == [(0.0, 0, ep.PREFILL.lower()), (0.5, 0, ep.DECODE.lower()), (0.5, 1, ep.PREFILL.lower()),
                    (1.0, 1, ep.DECODE.lower())]
    marks = [(tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in ax.get_lines() if ln.get_marker() == "x"]
    assert marks == [((1.0,), (0,))]
    assert ax.get_title() == "run: 3 steps, 1.50 s"


def test_as_sim_records_splits_prefill_and_decode_per_sequence():
    recs = ep.as_sim_records([_rec(5, 0.0, [(1, 1, False), (2, 6, True)], preempted=[3])])
    assert recs[0].step == 0 and recs[0].decode == {1: 1} and recs[0].prefill == {2: 6}
    assert recs[0].preempted == [3] and recs[0].used_blocks == 3


def test_install_scheduler_swaps_policy_and_limits_between_runs(llm):
    engine = llm.engine

    class Marked(Scheduler):
        pass

    new = ep.install_scheduler(engine, Marked, max_num_seqs=2)
    assert engine.scheduler is new and isinstance(new, Marked) and new.config.max_num_seqs == 2
    out = llm.generate([[1, 2, 3]] * 3, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert max(r.num_running for r in list(engine.step_log)[-4:]) <= 2 and len(out) == 3
    with pytest.raises(ValueError):
        ep.install_scheduler(engine, block_size=8)
    ep.install_scheduler(engine, Scheduler, max_num_seqs=8)
    engine.check_no_leaks()


def test_policy_outcome_counts_victims_and_recomputation_and_keeps_greedy_tokens(llm):
    prompts = [[i + 1] * n for i, n in enumerate((3, 9, 3, 9))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    roomy = ep.policy_outcome(llm, Scheduler, prompts, params, max_num_seqs=1)  # one at a time: no preemption
    assert roomy.victims == [] and roomy.recomputed_tokens == 0
    fcfs = ep.policy_outcome(llm, Scheduler, prompts, params)  # 4 x 4 blocks wanted, 12 in the pool
    cheap = ep.policy_outcome(llm, ep.CheapestFirst, prompts, params)
    assert fcfs.victims and cheap.victims and fcfs.tokens == cheap.tokens == roomy.tokens
    assert fcfs.recomputed_tokens > 0 and cheap.recomputed_tokens > 0
    compared = ep.policy_outcome(llm, ep.CheapestFirst, prompts, params, reference=ep.CheapestFirst)
    assert compared == cheap._replace(disagreements=0)  # same run, and every pick equals the reference's
    newest = ep.policy_outcome(llm, Scheduler, prompts, params, reference=ep.CheapestFirst)
    # the two runs share every state up to their first different pick: a disagreement exactly when victims differ
    assert newest.victims == fcfs.victims and (newest.disagreements > 0) == (fcfs.victims != cheap.victims)
    assert type(llm.engine.scheduler) is Scheduler and llm.engine.scheduler.config.max_num_seqs == 8


def test_benchmark_plots_label_every_system_and_setting():
    thr = {"config": "tiny", "dtype": "float32", "device": "cpu", "threads": 2, "meta": {"date": "2026-01-01"},
           "workload": {"requests": 4, "output_tokens": 40}, "minivllm": {"output_tokens_per_s": 300.0},
           "transformers": {"output_tokens_per_s": 30.0, "batch": 1}, "llama_cpp": {"error": "not installed"}}
    ax = ep.throughput(thr).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["minivllm (all requests at once)",
                                                            "transformers.generate (one at a time)"]
    assert "10.0x" in " ".join(t.get_text() for t in ax.texts)
    lat = {"config": "q", "dtype": "bfloat16", "output_len": 256, "ttft_prompt_len": 1024, "meta": {"gpu": "H200"},
           "targets": {"decode_ms_per_token": 0.6, "ttft_1k_ms": 30.0},
           "cuda_graphs": {"decode_ms_per_token": 0.5, "ttft_ms": 20.0}, "eager": {"decode_ms_per_token": 3.0, "ttft_ms": 25.0}}
    a, b = ep.latency(lat).axes
    assert [round(p.get_width(), 2) for p in a.patches] == [0.5, 3.0]
    assert any(ln.get_xdata()[0] == 30.0 for ln in b.get_lines())
    pre = {"config": "q", "num_requests": 4, "shared_len": 64, "suffix_len": 8, "prefill_tokens_saved": 0.9,
           "cache_off": {"prefill_tokens_computed": 288, "ttft_ms_median": 9.0},
           "cache_on": {"prefill_tokens_computed": 32, "ttft_ms_median": 3.0}, "meta": {}}
    a, b = ep.prefix(pre).axes
    assert [p.get_width() for p in a.patches] == [288, 32] and [p.get_width() for p in b.patches] == [9.0, 3.0]


def _overlapping_ticks(fig) -> list[tuple[str, str]]:
    """Pairs of neighbouring x tick labels whose drawn boxes overlap, over every panel."""
    fig.canvas.draw()
    pairs = []
    for ax in fig.axes:
        lo, hi = sorted(ax.get_xlim())
        ticks = [(t.get_position()[0], t.get_text(), t.get_window_extent()) for t in ax.get_xticklabels()
                 if t.get_text() and lo <= t.get_position()[0] <= hi]
        ticks.sort(key=lambda t: t[0])
        pairs += [(a[1], b[1]) for a, b in zip(ticks, ticks[1:]) if a[2].x1 > b[2].x0]
    return pairs


PREFIX_GPU = {"config": "qwen3-0.6b", "dtype": "bfloat16", "device": "cuda", "num_requests": 64, "shared_len": 2048,
              "suffix_len": 32, "prefill_tokens_saved": 0.9846, "meta": {"gpu": "NVIDIA H200", "date": "2026-11-29"},
              "cache_off": {"prefill_tokens_computed": 133120, "ttft_ms_median": 1450.62},
              "cache_on": {"prefill_tokens_computed": 2048, "ttft_ms_median": 402.81}}


def test_prefix_plot_ticks_do_not_overlap_and_the_figure_says_what_was_measured():
    fig = ep.prefix(PREFIX_GPU)
    assert _overlapping_ticks(fig) == []
    assert [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()][-1].endswith("k")
    title = fig._suptitle.get_text()
    assert "random bfloat16 weights" in title and "H200" in title
    (note,) = [t for t in fig.texts if t.get_gid() == "note"]
    assert "warm-up request" in note.get_text() and "2,080 prefill tokens" in note.get_text()
    cpu = ep.prefix({**PREFIX_GPU, "config": "default", "dtype": "float32", "device": "cpu", "meta": {}})
    assert "real weights" in cpu._suptitle.get_text() and _overlapping_ticks(cpu) == []


def test_throughput_and_latency_say_the_weights_are_random():
    thr = {"config": "qwen3-0.6b", "dtype": "bfloat16", "device": "cuda", "meta": {"gpu": "H200"},
           "workload": {"requests": 256, "output_tokens": 144160}, "minivllm": {"output_tokens_per_s": 4626.0},
           "transformers": {"output_tokens_per_s": 98.0, "batch": 16}}
    assert "random bfloat16 weights" in ep.throughput(thr)._suptitle.get_text()
    lat = {"config": "qwen3-0.6b", "dtype": "bfloat16", "output_len": 256, "ttft_prompt_len": 1024,
           "meta": {"gpu": "H200"}, "cuda_graphs": {"decode_ms_per_token": 2.45, "ttft_ms": 53.2},
           "eager": {"decode_ms_per_token": 38.5, "ttft_ms": 37.8}}
    fig = ep.latency(lat)
    assert "random bfloat16 weights" in fig._suptitle.get_text() and _overlapping_ticks(fig) == []


def test_throughput_plot_sets_the_fp8_cache_run_beside_the_first():
    thr = {"config": "qwen3-0.6b", "dtype": "bfloat16", "device": "cuda", "meta": {"gpu": "H100"},
           "workload": {"requests": 256, "output_tokens": 144160}, "minivllm": {"output_tokens_per_s": 16000.0},
           "minivllm_kv_fp8": {"output_tokens_per_s": 20000.0}, "minivllm_kv_fp8_vs_minivllm": 1.25,
           "transformers": {"output_tokens_per_s": 80.0, "batch": 8}}
    ax = ep.throughput(thr).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["minivllm (all requests at once)",
                                                            "minivllm, fp8 KV cache", "transformers.generate (batches of 8)"]
    assert [b.get_width() for b in ax.patches] == [16000.0, 20000.0, 80.0]
    labels = [t.get_text() for t in ax.texts]
    assert labels[1].endswith("(1.25x the first)") and labels[2].endswith("(minivllm: 200.0x)")


def test_throughput_plot_names_the_plain_runs_where_the_first_overlapped():
    thr = {"config": "qwen3-0.6b", "dtype": "bfloat16", "device": "cuda", "meta": {"gpu": "H100"},
           "workload": {"requests": 256, "output_tokens": 144160},
           "minivllm": {"output_tokens_per_s": 18000.0, "async_scheduling": True},
           "minivllm_kv_fp8_no_async": {"output_tokens_per_s": 19000.0, "async_scheduling": False}}
    ax = ep.throughput(thr).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "minivllm (all requests at once, overlapped loop)", "minivllm, fp8 KV cache, plain loop"]


def test_throughput_plot_names_the_overlapped_runs_in_the_order_they_ran():
    thr = {"config": "qwen3-0.6b", "dtype": "bfloat16", "device": "cuda", "meta": {"gpu": "H100"},
           "workload": {"requests": 256, "output_tokens": 144160}, "minivllm": {"output_tokens_per_s": 16000.0},
           "minivllm_kv_fp8": {"output_tokens_per_s": 19000.0}, "minivllm_async": {"output_tokens_per_s": 17000.0},
           "minivllm_kv_fp8_async": {"output_tokens_per_s": 20000.0}, "minivllm_async_vs_minivllm": 1.06}
    ax = ep.throughput(thr).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "minivllm (all requests at once)", "minivllm, fp8 KV cache", "minivllm, overlapped loop",
        "minivllm, fp8 KV cache, overlapped loop"]
    assert [b.get_width() for b in ax.patches] == [16000.0, 19000.0, 17000.0, 20000.0]


def test_run_profile_stacks_the_floor_the_busy_time_and_the_span():
    run = {"meta": {"gpu": "H100"}, "workload": {"requests": 256, "output_tokens": 144160},
           "profile": {"busy_s": 7.5, "idle_s": 0.5, "span_s": 8.0},
           "floors": {"kv_floor_s": 5.0, "weights_floor_s": 0.4, "hbm_gbps": 3000.0},
           "by_category": [{"category": "decode attention", "seconds": 5.5},
                           {"category": "matmul (cuBLAS)", "seconds": 1.0},
                           {"category": "norms", "seconds": 0.2}, {"category": "copies", "seconds": 0.1}]}
    fig = ep.run_profile(run)
    ax = fig.axes[0]
    rows = {}
    for bar in ax.patches:
        rows.setdefault(round(bar.get_y() + bar.get_height() / 2), []).append(bar.get_width())
    assert [round(sum(w), 6) for _, w in sorted(rows.items())] == [5.4, 7.5, 8.0]  # floor, busy, span
    assert sorted(rows[1]) == pytest.approx(sorted([5.5, 1.0, 0.0, 0.2, 0.8]))  # no qk-norm: 0; the rest 7.5 - 6.7
    assert "decode attention at 91% of its floor" in fig._suptitle.get_text()


def test_knockout_plot_draws_each_saving_and_each_matmuls_floor_from_its_bytes():
    saved = {"norms": 0.05, "qkv_proj": 0.09, "qkv_prep": 0.07, "attention": 0.2, "o_proj": 0.03,
             "gate_up_proj": 0.12, "down_proj": 0.1, "layers": 0.4}
    ko = {"config": "qwen3-0.6b", "meta": {"gpu": "H100", "hbm_peak_gbps": 2000.0}, "saved_ms_per_token": saved,
          "knockouts": {"none": {"decode_ms_per_token": 0.9}, "layers": {"decode_ms_per_token": 0.5}}}
    fig = ep.knockout(ko, layers=2, hidden=8, q=16, kv=4, intermediate=32)
    left, right = fig.axes
    assert [round(p.get_width(), 3) for p in left.patches] == [saved[k] for k in ep.KNOCKOUT_LABELS]
    assert [p.get_width() for p in right.patches] == [0.9, 0.5]
    floors = sorted(round(ln.get_xdata()[0], 9) for ln in left.get_lines() if len(ln.get_xdata()))
    bytes_ = [2 * 2 * rows * cols for rows, cols in ((8, 24), (16, 8), (8, 64), (32, 8))]  # layers x bf16
    assert floors == sorted(round(b / 2000e9 * 1e3, 9) for b in bytes_)
    assert "H100" in fig._suptitle.get_text() and _overlapping_ticks(fig) == []


def _host_run(batch: int, context: float, phases: dict[str, float], host: float) -> dict:
    ms = {name: {"median": v} for name, v in phases.items()}
    return {"workload": {"batch": batch, "context_mean": context}, "cpu_ms_per_step": {**ms, "host": {"median": host}}}


def test_host_overhead_stacks_the_phases_to_the_host_total_and_draws_the_target_only_at_batch_256():
    phases = dict.fromkeys((p for p, _ in ep.HOST_PHASES), 0.01)
    phases["inputs"] = 0.2
    for batch, context in ((1, 222.0), (256, 881.9)):
        runs = {"a": _host_run(batch, context, phases, 0.5)}
        fig = ep.host_overhead({"runs": runs}, [("a", "the run")])
        ax = fig.axes[0]
        widths = [p.get_width() for p in ax.patches]
        assert sum(widths) == pytest.approx(0.5) and max(widths) == pytest.approx(0.5 - sum(phases.values()))
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(dashed) == (batch >= 256)  # the 1 ms target belongs to the batch-256 step
        assert f"batch {batch}, ~{context:.0f}-token contexts" in fig._suptitle.get_text()
