"""Notebook 05's plots (minivllm.course.swiglu_plots): each one draws what its data says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minivllm.course import swiglu_plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_activation_curves_draw_relu_gelu_silu_and_mark_silus_minimum():
    fig = swiglu_plots.activation_curves()
    ax, gate_ax = fig.axes[:2]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert {"ReLU", "GELU", "SiLU = x · sigmoid(x)"} <= set(lines)
    x, y = lines["SiLU = x · sigmoid(x)"].get_data()
    assert np.isclose(y.min(), -0.27846, atol=1e-3) and np.isclose(x[y.argmin()], -1.278, atol=0.03)
    np.testing.assert_allclose(lines["ReLU"].get_ydata(), np.maximum(x, 0))
    assert any("min -0.278" in t.get_text() for t in ax.texts)
    image = gate_ax.get_images()[0].get_array()  # silu(g) * u over (u, g): closed for g << 0
    assert image.shape == (61, 121) and np.abs(image[:, 0]).max() < 0.1 < np.abs(image[:, -1]).max()


def test_traffic_counts_three_reads_two_writes_against_two_reads_one_write():
    t = swiglu_plots.traffic_bytes(tokens=10, inter=8, dtype_bytes=2)
    half = 10 * 8 * 2
    assert t["silu, then mul (2 kernels)"] == {"read": 3 * half, "written": 2 * half}
    assert t["fused silu_and_mul"] == {"read": 2 * half, "written": half}
    # bf16 -> fp32 (read 2, write 4), silu (2, 2), mul (4, 2), -> bf16 (2, 1), in halves of bf16
    assert t["eager fp32 reference"] == {"read": 10 * half, "written": 9 * half}
    fp32 = swiglu_plots.traffic_bytes(tokens=10, inter=8, dtype_bytes=4)  # no conversions: silu, then mul
    assert fp32["eager fp32 reference"] == fp32["silu, then mul (2 kernels)"]


def test_memory_traffic_bars_stack_reads_and_writes_in_megabytes():
    ax = swiglu_plots.memory_traffic(tokens=4096, inter=3072).axes[0]
    half_mb = 4096 * 3072 * 2 / 1e6
    widths = [round(p.get_width(), 3) for p in ax.patches]
    reads, writes = (3, 10, 2), (2, 9, 1)
    assert widths == [round(v * half_mb, 3) for v in (*reads, *writes)]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(swiglu_plots.traffic_bytes(1, 1))
    assert "1.67× fewer bytes" in ax.get_title()
