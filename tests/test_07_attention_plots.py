"""Notebook 07's plots (minivllm.course.attention_plots): each draws what its data says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minivllm.course import attention_plots as ap  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_attention_bytes_counts_by_hand():
    # n=64, one head of 2 values, 1-byte values, tiles of 32 queries
    got = ap.attention_bytes(64, n_heads=1, head_dim=2, dtype_bytes=1, rows=32)
    vec = 64 * 2
    assert got == {"naive": 4 * vec + 64 * 64 * 10, "tiled": 2 * vec + 2 * 2 * vec, "tiled_l2": 4 * vec}
    with pytest.raises(ValueError, match="n and rows"):
        ap.attention_bytes(0)


def test_attention_traffic_plots_both_curves_and_the_ratio():
    ax = ap.attention_traffic((1024, 4096), n_heads=2, head_dim=64, rows=64).axes[0]
    naive, tiled, tiled_l2 = ax.get_lines()[:3]
    want = [ap.attention_bytes(n, n_heads=2, head_dim=64, rows=64) for n in (1024, 4096)]
    np.testing.assert_allclose(naive.get_ydata(), [w["naive"] / 1e9 for w in want])
    np.testing.assert_allclose(tiled.get_ydata(), [w["tiled"] / 1e9 for w in want])
    np.testing.assert_allclose(tiled_l2.get_ydata(), [w["tiled_l2"] / 1e9 for w in want])
    ratio = want[-1]["naive"] / want[-1]["tiled_l2"]
    assert f"{ratio:.0f}x less traffic" in ax.get_title() and ratio > 10


def test_mask_matrix_is_block_diagonal_and_end_aligned():
    m = ap.mask_matrix([2, 3], [4, 3])
    assert m.shape == (5, 7)
    np.testing.assert_array_equal(m[:2, :4], [[1, 1, 1, 0], [1, 1, 1, 1]])  # 2 queries after 2 context keys
    np.testing.assert_array_equal(m[2:, 4:], [[2, 0, 0], [2, 2, 0], [2, 2, 2]])
    assert (m[:2, 4:] == 0).all() and (m[2:, :4] == 0).all()  # sequences never see each other
    assert (ap.mask_matrix([2], [3], causal=False) == 1).all()
    with pytest.raises(ValueError, match="one entry per sequence"):
        ap.mask_matrix([1, 2], [1])


def test_attention_mask_shows_the_matrix_and_counts_scores():
    ax = ap.attention_mask([2, 3], [4, 3]).axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), ap.mask_matrix([2, 3], [4, 3]))
    assert "13 of 35 scores" in ax.get_title()
    assert {"seq 0: 2 q x 4 k", "seq 1: 3 q x 3 k"} <= {t.get_text() for t in ax.texts}


def test_online_softmax_trace_ends_at_the_exact_normalizer():
    scores = np.array([0.5, 3.0, -1.0, 4.0, 2.0])
    fig = ap.online_softmax_trace(scores, tile=2)
    ax0, ax1 = fig.axes
    np.testing.assert_allclose(ax0.get_lines()[0].get_ydata()[:-1], [3.0, 4.0, 4.0])  # running max per tile
    l_final = ax1.get_lines()[0].get_ydata()[-1]
    np.testing.assert_allclose(l_final, np.exp(scores - 4.0).sum())
    with pytest.raises(ValueError, match="non-empty"):
        ap.online_softmax_trace(np.array([]), 2)


def _prefill_result():
    rows = []
    for n, numba_ms, paged_ms in [(512, 1.0, 1.2), (1024, 4.0, None), (2048, None, None)]:
        flops = 2 * 16 * 128 * n * (n + 1)
        sdpa_ms = n / 1e4
        rows.append({"tokens": n, "flops": flops, "sdpa_ms": sdpa_ms, "sdpa_tflops": flops / sdpa_ms / 1e9,
                     "numba_ms": numba_ms, "numba_tflops": numba_ms and flops / numba_ms / 1e9,
                     "numba_paged_ms": paged_ms, "numba_paged_tflops": paged_ms and flops / paged_ms / 1e9})
    return {"meta": {"gpu": "H200", "date": "2026-01-02T03:04:05"}, "peaks": {"bf16_tensor_tflops": 989.0,
                                                                              "fp32_fma_tflops": 67.0},
            "prefill": rows[::-1]}  # any order


def test_prefill_speed_draws_each_series_where_it_was_measured():
    result = _prefill_result()
    ax_ms, ax_tf = ap.prefill_speed(result).axes
    by_label = {line.get_label(): line for line in ax_ms.get_lines()}
    numba = by_label["ours (numba, scalar FMAs)"]
    np.testing.assert_array_equal(numba.get_xdata(), [512, 1024])  # 2048 was skipped (null)
    np.testing.assert_allclose(numba.get_ydata(), [1.0, 4.0])
    np.testing.assert_array_equal(by_label["ours, K/V from the paged pool"].get_xdata(), [512])
    sdpa = {line.get_label(): line for line in ax_tf.get_lines()}["SDPA flash backend (tensor cores)"]
    rows = sorted(result["prefill"], key=lambda r: r["tokens"])
    np.testing.assert_allclose(sdpa.get_ydata(), [r["sdpa_tflops"] for r in rows])
    peaks = sorted(line.get_ydata()[0] for line in ax_tf.get_lines() if "peak" in line.get_label())
    assert peaks == [67.0, 989.0]
    assert "H200, 2026-01-02" in ax_ms.figure.texts[0].get_text()
    with pytest.raises(ValueError, match="no prefill rows"):
        ap.prefill_speed({"prefill": []})


def test_tile_plan_by_hand():
    # 6 queries over 10 keys (4 cached): row i sees keys j < i + 5; blocks of 4 rows, tiles of 4 keys
    plan = ap.tile_plan(6, 10, rows=4, tile=4)
    # block 0 (rows 0-3, limits 5..8): tile 0 full, tile 1 (keys 4-7) diagonal, tile 2 (keys 8-9) never loaded
    # block 1 (rows 4-5, limits 9..10): tiles 0 and 1 full (row 4 sees keys < 9), tile 2 diagonal
    np.testing.assert_array_equal(plan, [[ap.FULL, ap.DIAGONAL, ap.SKIPPED], [ap.FULL, ap.FULL, ap.DIAGONAL]])
    whole = ap.tile_plan(10, 10, rows=4, tile=4)  # a whole prompt: the lower triangle
    np.testing.assert_array_equal(whole, [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
    assert ap.tile_plan(9, 9, rows=4, tile=4)[2, 2] == ap.FULL  # block 2 is row 8 alone, which sees key 8
    assert (ap.tile_plan(1, 1, rows=4, tile=4) == ap.FULL).all()  # one query, one key
    with pytest.raises(ValueError, match="q_len <= k_len"):
        ap.tile_plan(5, 3, rows=4, tile=4)


def test_kernel_tiles_draws_the_mask_and_counts_loaded_tiles():
    ax = ap.kernel_tiles(6, 10, rows=4, tile=4).axes[0]
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), ap.mask_matrix([6], [10]))
    assert "5 of 6 (block, tile) pairs loaded" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("full") and label.endswith("(3)") for label in labels)
    assert any(label.startswith("skipped") and label.endswith("(1)") for label in labels)
    assert len(ax.patches) == 6  # one rectangle per (block, tile)


def test_prefill_variants_draws_one_bar_per_build_at_each_length():
    def variant(warps, heavy, vs):
        return {"warps": warps, "heavy_first": heavy, "us": 1.0, "max_abs_err": 0.0, "vs_sdpa": vs}

    result = {"meta": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-05T10:00:00+00:00"},
              "rows": [{"tokens": 4096, "sdpa_flash_us": 300.0,
                        "variants": {"w4_in_order": variant(4, False, 0.53), "w8_heavy_first": variant(8, True, 0.61)}},
                       {"tokens": 1024, "sdpa_flash_us": 34.0,
                        "variants": {"w4_in_order": variant(4, False, 0.5), "w8_heavy_first": variant(8, True, 0.6)}}]}
    ax = ap.prefill_variants(result).axes[0]
    heights = {name: [round(b.get_height(), 3) for b in ax.patches if b.get_gid() == name]
               for name in ("w4_in_order", "w8_heavy_first")}
    assert heights == {"w4_in_order": [0.5, 0.53], "w8_heavy_first": [0.6, 0.61]}  # sorted by length
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1,024", "4,096"]
    labels = ax.get_legend_handles_labels()[1]
    assert "8 warps (128 query rows), heaviest tiles first" in labels and "SDPA flash backend" in labels
    assert "H100" in ax.get_title()
    with pytest.raises(ValueError, match="no rows"):
        ap.prefill_variants({"rows": []})
