"""Notebook 03's plots (minivllm.course.norm_plots): each draws what its data says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from minivllm.course import norm_plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


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
