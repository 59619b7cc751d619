"""Phase 00's pictures: every part of the engine is drawn with its phase, and request_path draws the data it is given."""

import importlib.util
import io

import pytest
from matplotlib.colors import to_rgba

from minivllm.course import diagrams, progress


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


# ----------------------------------------------------------------------------- the learner's workspace
def test_every_learner_component_plugs_into_a_part_of_the_picture():
    from minivllm import learner

    names = {c.name for c in diagrams.COMPONENTS}
    phases = {c.name: c.phase for c in diagrams.COMPONENTS}
    for name, comp in learner.COMPONENTS.items():
        part = progress.part_of(name)
        assert part in names, name
        assert phases[part] == comp.phase, (name, part)  # the part of the phase that writes it
    assert progress.part_of("store_kv") == "paged KV cache" and progress.part_of("paged_attention") == "paged attention"


def _component_file(folder, name: str, body: str) -> None:
    from minivllm import learner

    folder.mkdir(exist_ok=True)
    function = body.split()[1].split("(")[0]  # "def f(x): ..." -> "f"
    (folder / f"{name}.py").write_text(f"API_VERSION = {learner.API_VERSION}\n\n{body}\n\nCOMPONENT = {function}\n")


def _solid(fig) -> dict[str, bool]:
    boxes = _patches(fig, "component")[: len(diagrams.COMPONENTS)]
    return {c.name: box.get_alpha() == 1 and box.get_linestyle() == "-" for c, box in zip(diagrams.COMPONENTS, boxes)}


def test_a_fresh_workspace_fades_every_part_that_waits_for_an_exercise(tmp_path):
    status = progress.workspace_status(tmp_path / "none")
    fig = diagrams.learner_map(status)
    for name, solid in _solid(fig).items():
        assert solid == (status[name].state == "no exercise"), name
        assert status[name].yours == ()
    assert {n for n, st in status.items() if st.state == "no exercise"} == {
        "server", "tokenizer", "Qwen3 model", "radix cache", "launch layer"}
    notes = {t.get_text() for t in fig.axes[0].texts if t.get_gid() == "note"}
    assert "package's" in notes and all(n == "package's" or n.startswith("0/") for n in notes)
    assert any("0 of " in t.get_text() for t in fig.axes[0].texts if t.get_gid() == "summary")


def test_the_map_draws_what_the_workspace_holds_and_passes(tmp_path):
    ws = tmp_path / "workspace"
    _component_file(ws, "max_cached_tokens", "def max_cached_tokens(n, bs):\n    return (n - 1) // bs * bs")
    _component_file(ws, "select_victim", "def select_victim(running):\n    return running[0]")  # fails its check
    _component_file(ws, "rms_norm", "def rms_norm(x, w, eps):\n    return x")  # a kernel: not checked on a CPU
    status = progress.workspace_status(ws)
    assert status["scheduler"].yours == ("max_cached_tokens",) and status["scheduler"].state == "partly yours"
    assert status["scheduler"].note == f"1/{len(status['scheduler'].exercises)} yours"
    assert status["RMSNorm"].yours == ("rms_norm",) and status["RMSNorm"].on_gpu_only == ("rms_norm",)
    assert status["RMSNorm"].note == "1/2 yours"
    solid = _solid(diagrams.learner_map(status))
    assert not solid["scheduler"] and not solid["RMSNorm"] and solid["server"]
    _component_file(ws, "fused_add_rms_norm", "def fused_add_rms_norm(x, r, w, eps):\n    return x, r")
    status = progress.workspace_status(ws)
    assert status["RMSNorm"].state == "yours" and status["RMSNorm"].note == "yours (GPU)"
    assert _solid(diagrams.learner_map(status))["RMSNorm"]


def test_engine_steps_draws_each_step_and_the_block_table_after_it():
    steps = [diagrams.StepView(1, True, 0, 16, (4,), None, 3.0), diagrams.StepView(2, True, 16, 5, (4, 9), "The", 2.0),
             diagrams.StepView(3, False, 21, 1, (4, 9), " cat", 1.0), diagrams.StepView(4, False, 22, 1, (), "<end>", 1.0)]
    fig = diagrams.engine_steps(steps, 16)
    top, bottom = fig.axes
    bars = [p for p in top.patches if p.get_gid() == "step"]
    assert [b.get_height() for b in bars] == [16, 5, 1, 1]
    assert bars[0].get_facecolor() == bars[1].get_facecolor() != bars[2].get_facecolor()  # prefill vs decode
    labels = [t.get_text().strip() for t in top.texts]
    assert labels == ["no token yet", "The", "·cat", "<end>"]
    assert len([p for p in bottom.patches if p.get_gid() == "kv_block"]) == 1 + 2 + 2  # the tables' blocks
    assert [t.get_text() for t in bottom.texts] == ["4", "4", "9", "4", "9", "freed"]
    fig.savefig(io.BytesIO(), format="png")
