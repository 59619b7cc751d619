"""bench.targets: the table of the GPU engine's targets read from the files its parts write (checked on made-up
part files, so every status and the one-run check are exercised without a GPU)."""

import json

import matplotlib.colors as mcolors
import pytest

from bench import targets as tg
from minivllm.course import engine_plots


def _write(folder, name, data, commit="abc1234", gpu="NVIDIA H200"):
    meta = {"name": name, "commit": commit, "gpu": gpu, "date": "2026-12-07T00:00:00+00:00", "command": "x",
            "hbm_peak_gbps": 4000.0}
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, **data}))


def _norm_rows(default_us, compile_us):
    """Three norms at two sizes; 16k tokens move 4000 GB/s x 0.8 at ``default_us`` = 10."""
    rows = []
    for kernel in tg.NORMS:
        for tokens in (256, tg.NORM_HBM_TOKENS):
            rows.append({"kernel": kernel, "tokens": tokens, "default_us": default_us[kernel],
                         "compile_us": compile_us, "default_gbps": 3200.0 if tokens == tg.NORM_HBM_TOKENS else 100.0})
    return rows


@pytest.fixture
def folder(tmp_path):
    _write(tmp_path, "12_throughput_cuda", {"minivllm": {"output_tokens_per_s": 21_000.0},
                                            "speedup_vs_transformers": 150.0})
    _write(tmp_path, "12_latency_cuda", {"cuda_graphs": {"decode_ms_per_token": 0.8, "ttft_ms": 6.0}})
    _write(tmp_path, "07_attention", {"prefill": [
        {"tokens": 2048, "mma_async_vs_sdpa": 0.1},  # outside 4k-16k: not read
        {"tokens": 4096, "mma_async_vs_sdpa": 0.6}, {"tokens": 16384, "mma_async_vs_sdpa": 0.55}]})
    _write(tmp_path, "08_paged_attention", {"decode": [
        {"batch": 1, "context": 8192, "warp_floor_frac": 0.1},  # batch < 32: not read
        {"batch": 32, "context": 1024, "warp_floor_frac": 0.2},  # context < 2k: not read
        {"batch": 64, "context": 2048, "warp_floor_frac": 0.69},
        {"batch": 32, "context": 8192, "warp_floor_frac": 0.8}]})
    _write(tmp_path, "17_norm_variants_cuda", {"results": _norm_rows(
        {"rms_norm": 10.0, "fused_add_rms_norm": 9.0, "qk_norm": 12.0}, compile_us=11.0)})
    return tmp_path


def test_each_target_is_met_missed_or_missing_by_its_own_rule(folder):
    got = {t.measure.split(",")[0]: t for t in tg.targets(folder)}
    assert got["offline workload"].status == "met"  # 21k >= 20k
    assert got["vs transformers.generate"].status == "missed"  # 150 < 200
    assert got["batch-1 decode"].status == "missed"  # 0.8 > 0.6 (lower is better)
    assert got["TTFT"].status == "met"
    prefill = got["own flash prefill vs SDPA flash"]
    assert prefill.figure == 0.55 and prefill.status == "met"  # the slowest of 4k-16k; 2k's 0.1 is not read
    host = got["host time per decode step"]
    assert host.figure is None and host.status == "missing"  # no host part file
    decode = got["paged decode"]
    assert decode.figure == 0.69 and decode.status == "missed" and "64 x 2048" in decode.detail
    hbm = got[f"rms_norm at {tg.NORM_HBM_TOKENS} tokens"]
    assert hbm.figure == pytest.approx(0.8) and hbm.status == "met"
    pairs = got["norms faster than torch.compile"]
    assert (pairs.figure, pairs.goal) == (4, 6)  # qk_norm (12 us) loses to compile (11 us) at both sizes
    assert pairs.status == "missed" and pairs.detail.count("qk_norm") == 2


def test_the_host_part_is_read_from_its_own_entry(folder):
    entry = {"cpu_ms_per_step": {"host": {"median": 0.4}}, "workload": {"batch": 256}}
    _write(folder, "17_host_overhead_cpu", {"runs": {"other": {"cpu_ms_per_step": {"host": {"median": 9.0}}},
                                                     "targets": entry}}, gpu=None)
    host = next(t for t in tg.targets(folder) if t.measure.startswith("host time"))
    assert (host.figure, host.status) == (0.4, "met")


def test_the_knockout_part_gives_the_batch1_breakdown(folder):
    assert tg.summarize(folder)["batch1_breakdown"] is None  # not run: no breakdown, no target missing for it
    _write(folder, "17_knockout_cuda", {"knockouts": {"none": {"decode_ms_per_token": 0.9},
                                                      "layers": {"decode_ms_per_token": 0.3}},
                                        "saved_ms_per_token": {"attention": 0.2, "norms": 0.05}})
    summary = tg.summarize(folder)
    assert summary["batch1_breakdown"] == {"step_ms": 0.9, "without_layers_ms": 0.3,
                                           "saved_ms": {"attention": 0.2, "norms": 0.05}}
    assert summary["one_run"] and len(summary["parts"]) == 6


def test_files_from_different_commits_are_not_one_run(folder):
    assert tg.summarize(folder)["one_run"]
    _write(folder, "12_latency_cuda", {"cuda_graphs": {"decode_ms_per_token": 0.5, "ttft_ms": 6.0}}, commit="fff0000")
    summary = tg.summarize(folder)
    assert not summary["one_run"] and summary["commits"] == ["abc1234", "fff0000"]
    assert summary["met"] + summary["missed"] + summary["missing"] == len(summary["targets"])


def test_without_a_gpu_it_only_summarizes(folder, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert tg.main(["--out", str(folder)]) == 2
    assert tg.main(["--summarize", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "missed  batch-1 decode: 0.8 ms/token (target <= 0.6)" in out
    assert (folder / f"{tg.NAME}.json").exists() and (folder / f"{tg.NAME}.png").stat().st_size > 10_000


def test_targets_plot_draws_each_target_as_its_share_of_the_goal_colored_by_status():
    def row(measure, figure, goal, higher, status):
        return {"measure": measure, "figure": figure, "goal": goal, "higher_is_better": higher, "unit": "u",
                "source": "", "detail": "", "status": status}
    summary = {"targets": [row("tok/s", 30_000.0, 20_000, True, "met"), row("ms", 0.8, 0.6, False, "missed"),
                           row("host", None, 1.0, False, "missing")],
               "met": 1, "missed": 1, "missing": 1, "one_run": False, "commits": ["a", "b"], "gpus": ["H200"]}
    fig = engine_plots.targets(summary)  # the picture bench.targets saves
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    assert widths == pytest.approx([1.5, 0.75, 0.0])  # more is better: figure / goal; less is better: goal / figure
    colors = [mcolors.to_hex(p.get_facecolor()) for p in ax.patches]
    assert colors == [engine_plots.TARGET_COLORS[s].lower() for s in ("met", "missed", "missing")]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["30,000 u (goal ≥ 20,000)", "0.8 u (goal ≤ 0.6)", "not measured"]
    assert "NOT one run" in fig._suptitle.get_text() and "1 met, 1 missed, 1 not measured" in fig._suptitle.get_text()
