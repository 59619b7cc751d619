"""Phase 10's pictures (minivllm.course.sampler_plots): each one draws what the distributions say."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minivllm.course import sampler_plots  # noqa: E402

LABELS = [f"t{i}" for i in range(6)]
PROBS = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])


def test_filter_panels_draws_before_and_after_most_likely_first_and_marks_dropped_tokens():
    top2 = torch.tensor([0.0, 0.4 / 0.65, 0.0, 0.25 / 0.65, 0.0, 0.0])
    fig = sampler_plots.filter_panels(PROBS, {"top-k 2": top2, "temperature 1": PROBS}, LABELS, top=4)
    ax1, ax2 = fig.axes
    before, after = ax1.patches[:4], ax1.patches[4:]
    assert [p.get_height() for p in before] == pytest.approx([0.4, 0.25, 0.15, 0.1])
    assert [p.get_height() for p in after] == pytest.approx([0.4 / 0.65, 0.25 / 0.65, 0, 0])
    edges = [mcolors.to_hex(p.get_edgecolor()) for p in before]
    assert edges == [sampler_plots.BEFORE.lower()] * 2 + [sampler_plots.DROPPED.lower()] * 2
    assert "2 of 6 tokens left, holding 65%" in ax1.get_title(loc="left")
    assert "6 of 6 tokens left, holding 100%" in ax2.get_title(loc="left")
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["t1", "t3", "t4", "t2"]


def test_kept_tokens_draws_one_bar_per_filter_and_distribution_on_a_log_scale():
    table = {"open": {"top-k 50": 50, "top-p 0.9": 240}, "confident": {"top-k 50": 50, "top-p 0.9": 2}}
    ax = sampler_plots.kept_tokens(table, vocab_size=1000).axes[0]
    assert [round(p.get_height()) for p in ax.patches] == [50, 240, 50, 2]
    assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["top-k 50", "top-p 0.9"]
    assert any(ln.get_ydata()[0] == 1000 for ln in ax.get_lines())
    assert "240" in [t.get_text() for t in ax.texts]


def test_observed_vs_expected_plots_frequencies_and_the_exact_probabilities():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    counts = torch.tensor([52, 0, 28, 20])
    ax = sampler_plots.observed_vs_expected(counts, probs, ["a", "b", "c", "d"], title="p = 0.9").axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.52, 0.28, 0.20])
    assert ax.collections[0].get_offsets()[:, 1].tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "c", "d"]  # b has probability 0: not drawn
    assert ax.get_title() == "p = 0.9"


def test_token_boundaries_draws_a_box_per_token_and_brackets_the_stop_string_across_them():
    pieces = ["Paris", ".\n", "\nUs", "er", ":"]
    ax = sampler_plots.token_boundaries(pieces, "\n\nUser").axes[0]
    assert len(ax.patches) == 5
    texts = [t.get_text() for t in ax.texts]
    assert texts[:5] == ["Paris", ".\\n", "\\nUs", "er", ":"] and "stop string '\\n\\nUser'" in texts
    (bracket,) = ax.get_lines()
    xs = bracket.get_xdata()
    boxes = ax.patches
    assert boxes[1].get_x() < xs[0] < boxes[2].get_x()  # starts inside ".\n"
    assert boxes[3].get_x() + boxes[3].get_width() <= xs[-1] <= boxes[4].get_x()  # ends after "er"
    assert len(sampler_plots.token_boundaries(pieces, "nowhere").axes[0].get_lines()) == 0


def test_chi_square_matches_textbook_values_and_refuses_an_impossible_draw():
    stat, p = sampler_plots.chi_square(torch.tensor([60, 40]), torch.tensor([0.5, 0.5]))
    assert stat == pytest.approx(4.0) and p == pytest.approx(0.0455, abs=1e-4)  # df 1: P(X >= 4)
    counts = torch.tensor([10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10.0])
    probs = torch.full((11,), 1 / 11)
    assert sampler_plots.chi_square(counts, probs) == pytest.approx((0.0, 1.0))
    with pytest.raises(ValueError, match="probability 0"):
        sampler_plots.chi_square(torch.tensor([5, 1]), torch.tensor([1.0, 0.0]))
