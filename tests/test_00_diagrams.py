"""Phase 00's pictures: every part of the engine is drawn with its phase, and request_path draws the data it is given."""

import importlib.util
import io

import pytest
from matplotlib.colors import to_rgba

from minivllm.course import diagrams


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _patches(fig, gid: str) -> list:
    return [p for ax in fig.axes for p in ax.patches if p.get_gid() == gid]


def test_architecture_draws_every_component_and_every_phase():
    fig = diagrams.architecture()
    boxes = _patches(fig, "component")
    assert len(boxes) == len(diagrams.COMPONENTS) + 1  # and the client
    texts = _texts(fig)
    for c in diagrams.COMPONENTS:
        assert any(t.startswith(f"{c.name} · {c.phase}") for t in texts), c.name
        if c.name != "engine":
            assert c.module in texts
    for phase in range(1, 14):
        assert any(f"· {phase:02d}" in t for t in texts), f"phase {phase:02d} missing from the architecture"
    assert len(_patches(fig, "flow")) == len(diagrams.FLOW)
    assert len(_patches(fig, "uses")) == len(diagrams.USES)
    fig.savefig(io.BytesIO(), format="png")  # it renders


def test_architecture_fades_what_is_not_built():
    fig = diagrams.architecture(done={"tokenizer"})
    boxes = _patches(fig, "component")[: len(diagrams.COMPONENTS)]  # drawn in COMPONENTS order
    for c, box in zip(diagrams.COMPONENTS, boxes):
        ready = c.name == "tokenizer"
        assert (box.get_alpha() == 1) == ready, c.name
        assert (box.get_linestyle() == "-") == ready, c.name


def test_built_finds_the_modules_that_exist():
    done = diagrams.built()
    assert "launch layer" in done  # kernels._launch, phase 01
    for c in diagrams.COMPONENTS:
        assert c.module.split(".")[0] in ("minivllm", "kernels")
        parent = c.module.rsplit(".", 1)[0]
        exists = importlib.util.find_spec(parent) is not None and importlib.util.find_spec(c.module) is not None
        assert (c.name in done) == exists, c.name


def test_request_path_draws_the_request_it_is_given():
    ids = list(range(1000, 1024))  # 24 tokens: one full block of 16, one holding 8
    pieces = [f" t{i}" for i in range(24)]
    fig = diagrams.request_path(pieces, ids, [6, 11], 16, {" Paris": 0.7, " a": 0.2, " the": 0.1}, " a")
    texts = _texts(fig)
    assert len(_patches(fig, "token")) == 24
    assert all(str(i) in texts for i in ids)
    assert len(_patches(fig, "kv_block")) == 12  # physical blocks 0..11, the highest in the table
    full, half = (p.get_width() for p in _patches(fig, "kv_fill"))  # blocks 6 and 11, left to right
    assert half == pytest.approx(full / 2)
    assert "block table = [6, 11]" in " ".join(texts)
    assert any("block 11, slot 184" in t for t in texts)  # token 24 goes to 11 * 16 + 8
    bars = fig.axes[2].patches
    assert [b.get_height() for b in bars] == [0.7, 0.2, 0.1]
    assert bars[1].get_facecolor() != bars[0].get_facecolor() == bars[2].get_facecolor()  # the sampled one stands out
    fig.savefig(io.BytesIO(), format="png")


def test_request_path_rejects_inconsistent_data():
    probs = {" x": 1.0}
    with pytest.raises(ValueError, match="cannot hold"):
        diagrams.request_path(["a"] * 17, list(range(17)), [3], 16, probs, " x")
    with pytest.raises(ValueError, match="pieces"):
        diagrams.request_path(["a"], [1, 2], [0], 16, probs, " x")
    with pytest.raises(ValueError, match="candidates"):
        diagrams.request_path(["a"], [1], [0], 16, probs, " y")


def test_next_token_distributions_one_panel_per_distribution():
    dists = {"T = 1": [0.5, 0.3, 0.2], "T = 2": [0.4, 0.3, 0.3]}
    fig = diagrams.next_token_distributions(["a", "b", "c"], dists)
    assert [ax.get_title() for ax in fig.axes] == list(dists)
    for ax, p in zip(fig.axes, dists.values()):
        assert [bar.get_height() for bar in ax.patches] == p
        assert all(to_rgba(bar.get_facecolor()) == to_rgba(diagrams.COLORS["io"]) for bar in ax.patches)
    with pytest.raises(ValueError):
        diagrams.next_token_distributions(["a"], {"bad": [0.5, 0.5]})
