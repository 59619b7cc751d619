"""The learner's engine: a workspace made from the solution notebooks' answers serves the same tokens.

The workspace is built the way the notebooks build it (``course.check(..., component=...)`` ->
``minivllm.course.workspace.record``), from the solution cells of phases 10, 11 and 12, without running the
notebooks. The answer key is the package's own engine on the same requests: greedy, seeded top-p / min-p
sampling, stop strings, and a KV pool small enough that the learner's preemption policy is used.
"""

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from minivllm import learner
from minivllm.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
ANSWERS = [  # (notebook, function defined in a solution cell, component)
    ("10_sampler", "top_p_mask", "top_p_mask"), ("10_sampler", "min_p_mask", "min_p_mask"),
    ("10_sampler", "scan", "scan_stop_strings"), ("11_scheduler", "select_victim", "select_victim"),
    ("11_scheduler", "max_cached_tokens", "max_cached_tokens"), ("11_scheduler", "schedule", "schedule"),
    ("12_engine", "step", "step"),
]
HEADER = ("import math\nimport time\n\nimport torch\n\nfrom minivllm.scheduler import Scheduler\n"
          "from minivllm.sequence import FinishReason, Sequence, SequenceStatus\n\n\n")


def solution_function(notebook: str, name: str) -> str:
    """The source of ``def name`` in the solution notebook (the learner's answer)."""
    cells = json.loads((ROOT / "solutions" / f"{notebook}.ipynb").read_text())["cells"]
    for cell in cells:
        code = "".join(cell["source"])
        if cell["cell_type"] == "code" and f"def {name}(" in code:
            tree = ast.parse(code)
            node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
            return ast.get_source_segment(code, node)
    raise AssertionError(f"no def {name} in solutions/{notebook}.ipynb")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, monkeypatch_module):
    from minivllm.course import workspace as ws

    folder, src = tmp_path_factory.mktemp("workspace"), tmp_path_factory.mktemp("answers")
    monkeypatch_module.setenv("MINIVLLM_WORKSPACE", str(folder))
    monkeypatch_module.syspath_prepend(str(src))
    for notebook, name, component in ANSWERS:
        module = f"answer_{component}"
        (src / f"{module}.py").write_text(HEADER + solution_function(notebook, name) + "\n")
        __import__(module)
        assert ws.record(component, getattr(sys.modules[module], name)) == folder / f"{component}.py"
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_every_answer_loads_and_passes_its_check(workspace):
    parts = learner.load_parts(workspace, "cpu")
    whose = {name: who for name, who, _ in parts.report}
    assert {c for _, _, c in ANSWERS} == {n for n, w in whose.items() if w == "yours"}
    assert all(whose[k] == "package" for k in ("rms_norm", "apply_rope", "silu_and_mul"))  # not written


def test_missing_broken_and_stale_components_fall_back_with_a_reason(workspace, tmp_path):
    (tmp_path / "top_p_mask.py").write_text("API_VERSION = 1\nCOMPONENT = lambda logits, p: logits > 0\n")
    (tmp_path / "min_p_mask.py").write_text((workspace / "min_p_mask.py").read_text().replace(
        f"API_VERSION = {learner.API_VERSION}", "API_VERSION = 0"))
    (tmp_path / "scan_stop_strings.py").write_text("API_VERSION = 1\nraise SyntaxError('half-written')\n")
    (tmp_path / "rms_norm.py").write_text("API_VERSION = 1\nCOMPONENT = lambda x, weight, eps: x\n")
    report = {n: (w, why) for n, w, why in learner.load_parts(tmp_path, "cpu").report}
    assert report["top_p_mask"][0] == "package" and "different mask" in report["top_p_mask"][1]
    assert report["min_p_mask"][0] == "package" and "stale" in report["min_p_mask"][1]
    assert report["scan_stop_strings"][0] == "package" and "half-written" in report["scan_stop_strings"][1]
    assert report["select_victim"] == ("package", "not written yet (phase 11)")
    assert report["rms_norm"][0] == "package" and "on a CPU the model uses the PyTorch reference" in report["rms_norm"][1]


def test_the_learners_engine_serves_the_same_tokens_as_the_package(workspace):
    from minivllm.llm import LLM

    small = dict(dtype="float32", num_kv_blocks=9, max_num_seqs=4, max_num_batched_tokens=64)
    mine, package = LLM(learner=str(workspace), **small), LLM(**small)
    assert {n for n, w, _ in mine.engine.learner_report if w == "yours"} == {c for _, _, c in ANSWERS}
    assert type(mine.engine.sampler).__name__ == "LearnerSampler" and not package.engine.learner_report
    assert mine.engine.learner_step.__module__ == "minivllm_learner_step"  # the learner's step drives it
    assert type(mine.engine.scheduler).plan is not type(package.engine.scheduler).plan  # and plans each step
    questions = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
                 "Write one sentence about the Moon."]
    convs = [[{"role": "user", "content": q}] for q in questions]
    runs = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
            SamplingParams(temperature=0.9, top_p=0.8, min_p=0.05, seed=3, max_tokens=14, stop=[".", " is"])]
    for params in runs:
        a, b = (llm.chat(convs, params, use_tqdm=False) for llm in (mine, package))
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
        assert [(o.outputs[0].text, o.outputs[0].stop_reason) for o in a] == \
               [(o.outputs[0].text, o.outputs[0].stop_reason) for o in b]
    assert any(o.outputs[0].stop_reason in (".", " is") for o in a)  # the learner's scan found stop strings
    assert mine.engine.scheduler.num_preemptions > 0  # the learner's select_victim chose
    for llm in (mine, package):
        llm.engine.check_no_leaks()


if os.environ.get("MINIVLLM_WORKSPACE"):  # a developer's own workspace must not leak into these tests
    os.environ.pop("MINIVLLM_WORKSPACE")


def test_serve_learner_says_which_component_is_whose(workspace):
    from minivllm.llm import LLM
    from minivllm.model.config import ModelConfig
    from minivllm.server import ServerThread, build_app

    import httpx

    tiny = ModelConfig(architecture="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    engine = LLM(tiny, learner=str(workspace), num_kv_blocks=16).engine
    server = ServerThread(build_app(engine, model_name="yours")).start()
    try:
        parts = httpx.get(server.url + "/health").json()["components"]
        page = httpx.get(server.url + "/").text
    finally:
        server.stop()
    assert {p["name"] for p in parts if p["whose"] == "yours"} == {c for _, _, c in ANSWERS}
    assert len(parts) == len(learner.COMPONENTS) and "your engine" in page
