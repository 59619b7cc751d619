"""Notebook 03's plots (minivllm.course.norm_plots): each draws what its data says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from minivllm.course import norm_plots  # noqa: E402

META = {"gpu": "NVIDIA H200", "date": "2026-11-28T20:00:00+00:00", "command": "python -m bench.run kernels",
        "hbm_peak_gbps": 4300.0}


def _row(kernel, tokens, numba, eager=300.0, compile_=3000.0):
    return {"kernel": kernel, "tokens": tokens, "dtype": "bfloat16", "numba_gbps": numba, "eager_gbps": eager,
            "compile_gbps": compile_}


RESULT = {"meta": META, "results": [
    _row("rms_norm", 4096, 2500.0), _row("rms_norm", 16, 40.0), _row("qk_norm", 16, 30.0),
    _row("qk_norm", 4096, 2600.0), _row("rope", 4096, 9999.0),  # another phase's kernel: not drawn
]}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_norm_bandwidth_draws_one_panel_per_kernel_present_with_sorted_tokens():
    fig = norm_plots.norm_bandwidth(RESULT)
    assert [ax.get_title() for ax in fig.axes] == ["rms_norm (bfloat16)", "qk_norm (bfloat16)"]
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["numba kernel"].get_xdata()) == [16, 4096]
    assert list(lines["numba kernel"].get_ydata()) == [40.0, 2500.0]
    assert {"eager PyTorch", "torch.compile"} <= set(lines)
    peak = [ln for ln in fig.axes[1].get_lines() if ln.get_linestyle() == "--"]
    assert len(peak) == 1 and peak[0].get_ydata()[0] == 4300.0
    assert fig.axes[0].get_xscale() == "log"
    assert "NVIDIA H200, 2026-11-28" in fig._suptitle.get_text()
    assert max(max(ln.get_ydata()) for ln in fig.axes[1].get_lines()) < 9999.0  # rope is not on it


def test_norm_bandwidth_skips_a_missing_series_and_refuses_no_data():
    result = {"meta": {}, "results": [_row("fused_add_rms_norm", 256, 900.0, compile_=None)]}
    fig = norm_plots.norm_bandwidth(result)
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["numba kernel", "eager PyTorch"]
    with pytest.raises(ValueError, match="no results"):
        norm_plots.norm_bandwidth({"meta": {}, "results": [_row("rope", 1, 1.0)]})


def test_add_norm_traffic_counts_five_transfers_against_four():
    ax = norm_plots.add_norm_traffic(hidden=1024, dtype_bytes=2).axes[0]
    bars = [p for p in ax.patches if type(p) is Rectangle and p.get_width() > 0]
    unfused = sum(p.get_width() for p in bars if round(p.get_y() + p.get_height() / 2) == 0)
    fused = sum(p.get_width() for p in bars if round(p.get_y() + p.get_height() / 2) == 1)
    assert (unfused, fused) == (5 * 2048, 4 * 2048)
    assert "20% fewer bytes" in ax.get_title()
    assert {"10,240 B", "8,192 B"} <= {t.get_text() for t in ax.texts}


def test_two_level_reduction_draws_every_thread_warp_sum_and_partial():
    ax = norm_plots.two_level_reduction(warps=3, lanes=4).axes[0]
    boxes = [p for p in ax.patches if type(p) is Rectangle]
    assert len(boxes) == 3 * 4 + 3 + 3 + 1  # threads, warp sums, partials in shared memory, the total
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "cuda.syncthreads()" in texts and "shfl_xor_sync" in texts and "partials[warp]" in texts
    with pytest.raises(ValueError, match="warps"):
        norm_plots.two_level_reduction(warps=1)
