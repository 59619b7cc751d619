"""Phase 01's plots (minivllm.course.plots): each one draws what its data says, and names its source."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from minivllm.course import plots  # noqa: E402

META = {"gpu": "NVIDIA H200", "date": "2026-11-28T19:23:52+00:00", "command": "python -m bench.run basics",
        "hbm_peak_gbps": 4300.0}
RESULT = {
    "meta": META,
    "bandwidth": {"bytes": [4096, 1 << 20, 1 << 30],
                  "series": {"torch copy_": [9.0, 1500.0, 4200.0], "numba copy, 4 B/thread": [6.0, 900.0, 1900.0]}},
    "launch_us": {"torch op": 6.5, "numba, torch tensors": 83.4, "CUDA graph replay, per kernel": 1.1},
}


def _kernel_row(kernel: str, tokens: int, numba_us: float, eager_us: float, compile_us: float | None) -> dict:
    """One row of bench/results/03_05_kernels.json (made-up times: the tests check the drawing, not the GPU)."""
    moved = 4 * tokens * 1024  # bf16 in and out of a (tokens, 1024) tensor
    row = {"kernel": kernel, "tokens": tokens, "dtype": "bfloat16", "bytes": moved, "graph_us": None}
    for key, us in (("numba", numba_us), ("eager", eager_us), ("compile", compile_us)):
        row[f"{key}_us"], row[f"{key}_gbps"] = us, None if us is None else moved / us / 1e3
    return row


KERNELS = {"meta": dict(META, command="python -m bench.run kernels"), "results": [
    _kernel_row("rms_norm", 4096, 4.0, 40.0, 5.0), _kernel_row("rms_norm", 1, 1.0, 9.0, 1.5),
    _kernel_row("rope", 16, 1.0, 8.0, 1.0), _kernel_row("rope", 4096, 8.0, 100.0, 9.0),
    _kernel_row("rms_norm", 256, 1.2, 10.0, 1.4),
    _kernel_row("silu_and_mul", 4096, 1.0, 1.0, 1.0),  # not asked for below: never drawn
]}
SERIES = ["numba kernel", "eager PyTorch", "torch.compile"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_thread_hierarchy_draws_one_square_per_thread_with_its_global_index():
    fig = plots.thread_hierarchy(grid_blocks=3, block_threads=4)
    ax = fig.axes[0]
    squares = [p for p in ax.patches if type(p) is Rectangle]
    assert len(squares) == 3 * 4
    texts = _texts(ax)
    assert [f"blockIdx.x = {b}" for b in range(3)] == [t for t in texts if t.startswith("blockIdx")]
    assert "11" in texts and "12" not in texts  # global indices 0..11
    assert "blockIdx.x · blockDim.x + threadIdx.x" in ax.get_title()


@pytest.mark.parametrize("pattern, arrows", [("halving", 2 * (4 + 2 + 1)), ("xor", 2 * 8 * 3)])
def test_reduction_tree_has_log2_steps_and_one_arrow_per_operand(pattern, arrows):
    ax = plots.reduction_tree(8, pattern=pattern).axes[0]
    assert sum(1 for t in _texts(ax) if t.startswith("stride")) == 3
    assert sum(1 for c in ax.get_children() if type(c).__name__ == "Annotation") == arrows
    assert "Σ8" in _texts(ax)


def test_reduction_tree_refuses_a_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        plots.reduction_tree(6)
    with pytest.raises(ValueError, match="pattern"):
        plots.reduction_tree(8, pattern="tree")


def test_bandwidth_plots_every_series_and_the_hbm_peak_on_a_log_axis():
    ax = plots.bandwidth(RESULT, l2_bytes=50e6).axes[0]
    lines = ax.get_lines()
    series = [ln for ln in lines if ln.get_label() in RESULT["bandwidth"]["series"]]
    assert len(series) == 2
    assert list(series[0].get_ydata()) == RESULT["bandwidth"]["series"]["torch copy_"]
    peak = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert len(peak) == 1 and peak[0].get_ydata()[0] == 4300.0
    assert any(ln.get_linestyle() == ":" and ln.get_xdata()[0] == 25e6 for ln in lines)  # L2 marker
    assert ax.get_xscale() == "log"
    assert "GB/s" in ax.get_ylabel() and "bytes" in ax.get_xlabel()
    assert "NVIDIA H200, 2026-11-28" in ax.get_title() and "bench.run basics" in ax.get_title()


def test_bandwidth_without_a_known_peak_draws_no_peak_line():
    result = dict(RESULT, meta={"gpu": "some GPU", "date": "2026-01-01", "hbm_peak_gbps": None})
    ax = plots.bandwidth(result).axes[0]
    assert [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"] == []


def test_launch_overhead_draws_one_labelled_bar_per_way_in_order():
    ax = plots.launch_overhead(RESULT).axes[0]
    assert [round(p.get_width(), 1) for p in ax.patches] == [6.5, 83.4, 1.1]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(RESULT["launch_us"])
    assert "83.4 µs" in _texts(ax)
    assert "µs" in ax.get_xlabel() and "NVIDIA H200" in ax.get_title()


def test_provenance_names_gpu_date_and_command():
    assert plots.provenance(META) == "NVIDIA H200, 2026-11-28  ·  `python -m bench.run basics`"
    assert plots.provenance({}) == "unknown GPU, unknown date"


def _gbps(kernel: str, key: str) -> list[float]:
    rows = sorted((r for r in KERNELS["results"] if r["kernel"] == kernel), key=lambda r: r["tokens"])
    return [r[f"{key}_gbps"] for r in rows]


def test_kernel_bandwidth_draws_one_panel_per_kernel_with_three_series_and_the_peak():
    fig = plots.kernel_bandwidth(KERNELS, ["rms_norm", "rope"])
    assert len(fig.axes) == 2
    for ax, kernel, tokens in zip(fig.axes, ["rms_norm", "rope"], [[1, 256, 4096], [16, 4096]]):
        assert ax.get_title() == f"{kernel} (bfloat16)"
        lines = ax.get_lines()
        series = [ln for ln in lines if ln.get_linestyle() != "--"]
        assert [ln.get_label() for ln in series] == SERIES
        for ln, key in zip(series, ["numba", "eager", "compile"]):
            assert list(ln.get_xdata()) == tokens  # sorted by tokens, only this kernel's rows
            assert list(ln.get_ydata()) == pytest.approx(_gbps(kernel, key))
        peak = [ln for ln in lines if ln.get_linestyle() == "--"]
        assert len(peak) == 1 and list(peak[0].get_ydata()) == [4300.0, 4300.0]
        assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"{t:,}" for t in tokens]
    left, right = fig.axes
    assert left.get_shared_y_axes().joined(left, right) and right.get_ylim() == left.get_ylim()
    assert left.get_ylim()[1] >= 4300.0  # the peak fits
    assert "GB/s" in left.get_ylabel()
    suptitle = fig._suptitle.get_text()
    assert suptitle.startswith("rms_norm, rope")
    assert "NVIDIA H200, 2026-11-28" in suptitle and "bench.run kernels" in suptitle


def test_kernel_bandwidth_takes_a_title_and_a_peak_and_skips_what_was_not_measured():
    result = {"meta": {"gpu": "some GPU", "date": "2026-01-01", "hbm_peak_gbps": None},
              "results": [_kernel_row("qk_norm", 16, 1.0, 2.0, None), _kernel_row("qk_norm", 1, 1.0, 2.0, 1.0)]}
    fig = plots.kernel_bandwidth(result, ("rms_norm", "fused_add_rms_norm", "qk_norm"), title="RMSNorm kernels")
    assert len(fig.axes) == 1  # rms_norm and fused_add_rms_norm have no rows
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == SERIES[:2]  # compile missing at 16 tokens
    assert fig._suptitle.get_text() == "RMSNorm kernels\nmeasured on some GPU, 2026-01-01"
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert dashed == []  # no known peak: no line
    fig = plots.kernel_bandwidth(result, ["qk_norm"], peak_gbps=3000.0)
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == 3000.0


def test_kernel_bandwidth_refuses_kernels_without_results_and_a_bare_name():
    with pytest.raises(ValueError, match="no results for any of the kernels"):
        plots.kernel_bandwidth(KERNELS, ["qk_norm"])
    with pytest.raises(TypeError, match="sequence of kernel names"):
        plots.kernel_bandwidth(KERNELS, "rope")
