"""Phase 13's pictures (minivllm.course.serve_plots) and the benchmark's statistics: each draws what the data says."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from bench.serve import percentile  # noqa: E402
from minivllm.course import serve_plots  # noqa: E402


def _level(c, tps, ttft, itl):
    return {"concurrency": c, "output_tokens_per_s": tps, "ttft_ms": {"p50": ttft, "p99": 2 * ttft},
            "itl_ms": {"p50": itl, "p99": 3 * itl}}


RESULT = {"config": "default", "device": "cpu", "max_tokens": 32,
          "levels": [_level(4, 300.0, 50.0, 12.0), _level(1, 100.0, 20.0, 10.0), _level(16, 600.0, 200.0, 25.0)]}


def test_serve_scaling_draws_each_level_in_concurrency_order():
    fig = serve_plots.serve_scaling(RESULT)
    a, b, c = fig.axes
    (line,) = a.get_lines()
    assert list(line.get_xdata()) == [1, 4, 16] and list(line.get_ydata()) == [100.0, 300.0, 600.0]
    p50, p99 = b.get_lines()
    assert list(p50.get_ydata()) == [20.0, 50.0, 200.0] and list(p99.get_ydata()) == [40.0, 100.0, 400.0]
    assert p99.get_linestyle() == "--"
    assert list(c.get_lines()[1].get_ydata()) == [30.0, 36.0, 75.0]
    assert a.get_xscale() == "log" and "cpu" in fig._suptitle.get_text()


def test_serve_scaling_overlays_several_results():
    gpu = {**RESULT, "device": "cuda", "levels": [_level(1, 1000.0, 5.0, 1.0), _level(64, 20000.0, 40.0, 3.0)]}
    fig = serve_plots.serve_scaling([RESULT, gpu], labels=["cpu", "gpu"])
    assert len(fig.axes[0].get_lines()) == 2 and len(fig.axes[1].get_lines()) == 4
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [1000.0, 20000.0]


def test_summary_rows_and_empty_results():
    assert serve_plots.summary_rows(RESULT)[0] == (1, 100.0, 20.0, 40.0, 10.0, 30.0)
    with pytest.raises(ValueError):
        serve_plots.summary_rows({"levels": []})


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(values, 50) == 3.0 and percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0 and percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([], 50) != percentile([], 50)  # nan


def test_one_legend_per_figure_and_plain_client_counts():
    for fig in (serve_plots.serve_scaling(RESULT), serve_plots.serve_scaling([RESULT, RESULT], labels=["a", "b"])):
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "4", "16"]
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["p50 (median)", "p99", "a", "b"]


def test_a_random_model_says_so_in_the_title():
    gpu = {**RESULT, "config": "qwen3-0.6b", "device": "cuda", "dtype": "bfloat16"}
    assert "random bfloat16 weights" in serve_plots.serve_scaling(gpu)._suptitle.get_text()
    assert "real weights" in serve_plots.serve_scaling({**RESULT, "dtype": "float32"})._suptitle.get_text()
