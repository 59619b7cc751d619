"""Notebook 04's plots (minivllm.course.rope_plots): each draws what its data says."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minivllm.course import rope_plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_pair_rotation_keeps_each_pair_on_its_circle_and_turns_it_by_its_frequency():
    d, theta = 8, 10_000.0
    fig = rope_plots.pair_rotation(head_dim=d, theta=theta, n_positions=5)
    assert len(fig.axes) == d // 2
    for i, ax in enumerate(fig.axes):
        points = ax.collections[0].get_offsets()  # (positions, 2): the pair at positions 0..4
        assert len(points) == 5
        radius = np.hypot(points[:, 0], points[:, 1])
        np.testing.assert_allclose(radius, radius[0], rtol=1e-5)  # a rotation keeps the length
        angle = np.unwrap(np.arctan2(points[:, 1], points[:, 0]))
        np.testing.assert_allclose(np.diff(angle), theta ** (-2 * i / d), rtol=1e-3, atol=1e-6)
        assert f"pair ({i}, {i + d // 2})" in ax.get_title()


def test_relative_scores_are_constant_along_diagonals_and_the_curves_coincide():
    fig = rope_plots.relative_scores(head_dim=16, n_positions=12, offsets=(0, 300))
    left, right = fig.axes[0], fig.axes[1]
    scores = left.images[0].get_array()
    assert scores.shape == (12, 12)
    for offset in range(-11, 12):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-4)
    assert not np.allclose(scores[0], scores[0, 0])  # ... but not constant overall
    a, b = (line.get_ydata() for line in right.get_lines())
    np.testing.assert_allclose(a, b, atol=1e-3)
    np.testing.assert_allclose(a, scores[:, 0], atol=1e-3)  # query at m = distance, key at n = 0
