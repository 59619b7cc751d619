"""Phase 08's pictures (minivllm.course.paged_plots): each one draws what the simulation or the tables say."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from minivllm.course import paged_plots  # noqa: E402


@pytest.fixture(scope="module")
def results():
    return paged_plots.simulate_fragmentation(num_slots=2048, max_len=512, block_size=16, requests=400)


def test_paging_keeps_more_of_the_memory_holding_tokens(results):
    by = {r.scheme: r for r in results}
    reserve, exact, paged = (by[s] for s in paged_plots.SCHEMES)
    assert paged.holds_tokens > exact.holds_tokens > reserve.holds_tokens
    assert exact.reserved_empty == 0.0 and reserve.unusable_free == 0.0  # max_len allocations tile the memory
    # paged waste inside allocations is the half-empty last block of each sequence: small, never zero
    assert 0 < paged.reserved_empty < reserve.reserved_empty / 10
    for r in results:
        assert r.refusals > 100
        assert abs(r.holds_tokens + r.reserved_empty + r.unusable_free - 1.0) < 1e-9


def test_simulation_is_reproducible():
    a = paged_plots.simulate_fragmentation(num_slots=512, max_len=128, requests=100, seed=3)
    assert a == paged_plots.simulate_fragmentation(num_slots=512, max_len=128, requests=100, seed=3)


def test_fragmentation_plot_draws_the_fractions_as_bar_widths(results):
    fig = paged_plots.fragmentation_plot(results)
    bars = fig.axes[0].patches
    assert len(bars) == 3 * len(results)
    for i, r in enumerate(results):  # bars go part by part within each scheme
        widths = [b.get_width() for b in bars[3 * i:3 * i + 3]]
        assert widths == pytest.approx([r.holds_tokens, r.reserved_empty, r.unusable_free])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(paged_plots.SCHEMES)


def test_block_table_picture_colours_each_physical_block_by_its_owner():
    tables = {"A": [5, 0, 3], "B": [1, 6]}
    fig = paged_plots.draw_block_tables(tables, {"A": 40, "B": 20}, num_blocks=8, block_size=16)
    ax = fig.axes[0]
    pool = {p.get_gid(): p.get_facecolor() for p in ax.patches if isinstance(p, Rectangle) and p.get_gid()}
    assert len(pool) == 8
    a_color, b_color = pool["pool5"], pool["pool1"]
    assert a_color != b_color
    assert all(pool[f"pool{b}"] == a_color for b in tables["A"])
    assert all(pool[f"pool{b}"] == b_color for b in tables["B"])
    assert pool["pool2"] == pool["pool4"] == pool["pool7"] != a_color  # free blocks
    assert len(ax.lines) == 5  # one line per logical block
    texts = [t.get_text() for t in ax.texts]
    assert "A (40 tokens)" in texts and "B (20 tokens)" in texts


def _decode_result():
    rows = []
    for batch in (1, 32):
        for ctx in (512, 2048):
            floor = batch * ctx / 100
            row = {"batch": batch, "context": ctx, "floor_us": floor, "paged_us": 10 * floor, "warp_us": 2 * floor,
                   "gather_sdpa_us": 4 * floor, "sdpa_us": 1.5 * floor}
            for k in ("paged", "warp"):
                row[f"{k}_floor_frac"] = floor / row[f"{k}_us"]
            rows.append(row)
    return {"meta": {"gpu": "H200", "date": "2026-01-02"}, "floor_target": 0.6, "decode": rows}


def test_decode_vs_floor_draws_fractions_per_batch_and_times_at_one_batch():
    result = _decode_result()
    ax_f, ax_t = paged_plots.decode_vs_floor(result, batch=32).axes
    lines = {line.get_gid(): line for line in ax_f.get_lines() if line.get_gid()}
    assert set(lines) == {"paged:1", "paged:32", "warp:1", "warp:32"}
    assert list(lines["warp:32"].get_xdata()) == [512, 2048]
    assert list(lines["warp:32"].get_ydata()) == pytest.approx([0.5, 0.5])
    assert list(lines["paged:1"].get_ydata()) == pytest.approx([0.1, 0.1])
    assert any(line.get_ydata()[0] == 0.6 for line in ax_f.get_lines() if not line.get_gid())  # the target
    times = {line.get_gid(): list(line.get_ydata()) for line in ax_t.get_lines()}
    at32 = [r for r in result["decode"] if r["batch"] == 32]
    for key in ("floor", "paged", "warp", "gather_sdpa", "sdpa"):
        assert times[key] == pytest.approx([r[f"{key}_us"] for r in at32])


def test_decode_vs_floor_leaves_out_a_kernel_that_was_not_measured():
    result = _decode_result()
    for r in result["decode"]:
        r["warp_us"] = r["warp_floor_frac"] = None
    ax_f, ax_t = paged_plots.decode_vs_floor(result, batch=1).axes
    assert {line.get_gid() for line in ax_f.get_lines() if line.get_gid()} == {"paged:1", "paged:32"}
    assert "warp" not in {line.get_gid() for line in ax_t.get_lines()}


def test_no_two_decode_lines_look_alike():
    """Every (kernel, batch) line of the left panel differs from every other in colour, and each kernel has its own
    line style and marker; the legend holds each line once, and the figure has no second legend on that panel."""
    result = _decode_result()
    for r in result["decode"]:  # six batch sizes, as the H200 result has: twelve lines
        r.update(batch=r["batch"])
    rows = [dict(r, batch=b) for b in (1, 8, 32, 64, 128, 256) for r in result["decode"][:2]]
    result["decode"] = rows
    fig = paged_plots.decode_vs_floor(result, batch=32)
    ax_f = fig.axes[0]
    lines = [line for line in ax_f.get_lines() if line.get_gid()]
    assert len(lines) == 12
    looks = [(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines]
    assert len(set(looks)) == 12 and len({c for c, _, _ in looks}) == 12  # not even a colour is shared
    for kernel in ("paged", "warp"):
        styles = {(line.get_linestyle(), line.get_marker()) for line in lines if line.get_gid().startswith(kernel)}
        assert len(styles) == 1
    assert ax_f.get_legend() is None and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["v1, batch 1", "v2, batch 1"]


def test_rounding_error_plot_puts_fp8_far_above_bf16():
    import torch

    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0)) * 4
    fig = paged_plots.rounding_error(x, {"bf16": torch.bfloat16, "fp8 (e4m3)": torch.float8_e4m3fn}, bins=12)
    lines = {ln.get_gid(): (ln.get_xdata(), ln.get_ydata()) for ln in fig.axes[0].lines}
    (size, bf16), (_, fp8) = lines["bf16"], lines["fp8 (e4m3)"]
    ok = ~(np.isnan(bf16) | np.isnan(fp8))
    assert ok.sum() >= 8 and (fp8[ok] > 4 * bf16[ok]).all()  # 3 mantissa bits against 7: ~16x coarser
    normal = ok & (size > 2 ** -5)  # e4m3's normal values: at most half a step (1/16) lost; bf16: 1/256
    assert normal.sum() >= 5 and (bf16[ok] < 2 ** -8).all() and (fp8[normal] < 2 ** -4).all()
    assert fp8[ok][0] > 0.5  # the smallest values (~1e-4, below e4m3's 2^-9) are mostly lost


def test_fp8_variants_plot_draws_each_builds_speed_over_bf16():
    row = {"bf16": 100.0, "fp8_shift": 80.0, "fp8_cvt": 70.0, "fp8_h2": 64.0, "fp8_cvth2": 56.0, "floor_fp8_us": 49.0}
    result = {"meta": {"gpus": {"h100": "NVIDIA H100"}}, "h100": {"b32_ctx2048": row, "graph_b1": {**row, "bf16": 7.0}}}
    ax = paged_plots.fp8_variants(result).axes[0]
    heights = {}
    for bar in ax.patches:
        heights.setdefault(bar.get_gid(), []).append(round(bar.get_height(), 3))
    assert heights == {"fp8_shift": [1.25, 0.088], "fp8_cvt": [1.429, 0.1], "fp8_h2": [1.562, 0.109],
                       "fp8_cvth2": [1.786, 0.125]}
    assert [t.get_text() for t in ax.texts][:2] == ["88%", "88%"]  # 49 / 56 over each case's last bar
    assert "NVIDIA H100" in ax.get_title()
