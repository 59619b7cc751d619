"""Phase 09's pictures (minivllm.course.radix_plots): each one draws what the cache or the data says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from minivllm.cache import BlockAllocator, RadixCache  # noqa: E402
from minivllm.course import radix_plots  # noqa: E402

WORDS = ["sys", "be", "nice", ".", "hi", "there", "bye", "now"]


def _cache():
    """root -> [sys be nice .] -> {[hi there], [bye now] (locked)}, block size 2."""
    allocator = BlockAllocator(16)
    cache = RadixCache(allocator, block_size=2)
    for tokens in ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 6, 7]):
        table = allocator.allocate(3)
        allocator.free(cache.insert(tokens, table).blocks)
    locked = cache.match_prefix([0, 1, 2, 3, 6, 7]).node
    cache.lock(locked)
    return cache, locked


def _boxes(ax):
    return [p for p in ax.patches if isinstance(p, FancyBboxPatch)]


def test_snapshot_lists_every_node_parent_first_with_its_words_blocks_and_locks():
    cache, locked = _cache()
    snap = radix_plots.tree_snapshot(cache, WORDS, highlight=[locked])
    assert [n.label for n in snap] == ["root", "sys be nice .", "hi there", "bye now"]
    assert [n.parent for n in snap] == [None, 0, 1, 1]
    assert [n.lock_ref for n in snap] == [0, 1, 0, 1]
    assert [n.highlighted for n in snap] == [False, False, False, True]
    assert snap[1].blocks == (0, 1) and snap[2].blocks == (2,) and snap[3].blocks == (5,)
    assert radix_plots.tree_snapshot(cache, lambda t: f"<{t}>")[3].label == "<6> <7>"


def test_draw_trees_draws_one_box_per_node_coloured_by_lock_state_in_each_panel():
    cache, locked = _cache()
    before = radix_plots.tree_snapshot(cache, WORDS, highlight=[locked])
    cache.unlock(locked)
    cache.evict(1)  # the least recently used leaf: [hi there]
    after = radix_plots.tree_snapshot(cache, WORDS)
    fig = radix_plots.draw_trees([before, after], ["before", "after"])
    ax1, ax2 = fig.axes
    assert (ax1.get_title(), ax2.get_title()) == ("before", "after")
    assert len(_boxes(ax1)) == 4 and len(_boxes(ax2)) == 3
    assert len(ax1.get_lines()) == 3  # one edge per non-root node
    colors = [mcolors.to_hex(b.get_facecolor()) for b in _boxes(ax1)]
    assert colors.count(radix_plots.LOCKED.lower()) == 2 and colors.count(radix_plots.EVICTABLE.lower()) == 1
    assert sum(mcolors.to_hex(b.get_edgecolor()) == radix_plots.HIGHLIGHT.lower() for b in _boxes(ax1)) == 1
    texts = [t.get_text() for t in ax2.texts]
    assert "bye now" in texts and "hi there" not in texts
    assert "blocks 0,1" in texts


def test_draw_tree_shortens_long_edge_labels():
    cache, _ = _cache()
    ax = radix_plots.draw_tree(cache, WORDS, title="now").axes[0]
    assert ax.get_title() == "now"
    texts = [t.get_text() for t in ax.texts]
    assert "sys be nice ." in texts
    short = radix_plots.draw_trees([radix_plots.tree_snapshot(cache, WORDS)], max_chars=6).axes[0]
    assert "sys b…" in [t.get_text() for t in short.texts]


SWEEP = {"cache_blocks": [64, 128, 256], "token_hit_rate": [0.2, 0.5, 0.6], "prefill_tokens": [800, 500, 400],
         "prefill_tokens_without_cache": 1000, "system_prompt_hit_rate": 0.3, "working_set_blocks": 200}


def test_cache_size_sweep_plots_hit_rate_in_percent_and_prefill_against_the_no_cache_line():
    ax1, ax2 = radix_plots.cache_size_sweep(SWEEP).axes
    (rate,) = [ln for ln in ax1.get_lines() if ln.get_marker() == "o"]
    assert list(rate.get_xdata()) == [64, 128, 256] and list(rate.get_ydata()) == pytest.approx([20, 50, 60])
    assert any(ln.get_linestyle() == "--" and ln.get_ydata()[0] == pytest.approx(30) for ln in ax1.get_lines())
    (prefill,) = [ln for ln in ax2.get_lines() if ln.get_marker() == "o"]
    assert list(prefill.get_ydata()) == [800, 500, 400]
    assert any(ln.get_linestyle() == "--" and ln.get_ydata()[0] == 1000 for ln in ax2.get_lines())
    for ax in (ax1, ax2):
        assert ax.get_xscale() == "log" and "KV blocks" in ax.get_xlabel()
        assert any(ln.get_linestyle() == ":" and ln.get_xdata()[0] == 200 for ln in ax.get_lines())
    assert "%" in ax1.get_ylabel()


def test_radix_ops_draws_one_bar_per_operation_with_its_rate():
    result = {"cpu": "Some CPU", "meta": {"date": "2026-11-28T20:00:00+00:00"},
              "workload": {"sequences": 10_000, "tokens_per_sequence": 1024},
              "ops_per_s": {"insert": 15_000, "match_prefix": 60_000, "evict(64 blocks)": 20_000}}
    ax = radix_plots.radix_ops(result).axes[0]
    assert [round(p.get_width()) for p in ax.patches] == [15_000, 60_000, 20_000]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(result["ops_per_s"])
    assert "60,000/s" in [t.get_text() for t in ax.texts]
    assert "10,000 cached sequences of 1024 tokens" in ax.get_title() and "Some CPU, 2026-11-28" in ax.get_title()
