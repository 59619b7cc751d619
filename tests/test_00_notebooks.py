"""The learner notebooks are exactly what the generator makes from the solutions, and the stubs work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minivllm import course
from minivllm.course.exercises import STUB, expected_files, strip_solutions

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_there_are_notebooks_and_they_are_numbered():
    assert SOLUTIONS, "no solution notebooks"
    for path in SOLUTIONS:
        assert path.name[:2].isdigit() and path.name[2] == "_", path.name


def test_learner_notebooks_are_generated_from_solutions():
    proc = subprocess.run([sys.executable, "-m", "minivllm.course.exercises", "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, "run `python -m minivllm.course.exercises`:\n" + proc.stdout


def test_stored_notebooks_are_clean():
    for path, text in expected_files(ROOT).items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)}: outputs or metadata not cleaned"


def test_every_cell_has_its_own_id():
    """nbformat 4.5 cells carry an ``id`` (nbval and JupyterLab warn on a cell without one, and a future nbformat
    refuses it); ids are unique within a notebook."""
    for path in [*SOLUTIONS, *sorted((ROOT / "notebooks").glob("*.ipynb"))]:
        nb = json.loads(path.read_text())
        ids = [cell.get("id") for cell in nb["cells"]]
        assert None not in ids and len(set(ids)) == len(ids), f"{path.relative_to(ROOT)}: {ids}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_solutions_require_every_check_to_pass(path):
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert "course.setup(" in code[0], "the first code cell must call course.setup()"
    assert "course.require_solutions()  # solutions only" in code[0]
    learner = json.loads((ROOT / "notebooks" / path.name).read_text())["cells"]
    n_solutions = sum(c.count("### BEGIN SOLUTION") for c in code)
    n_stubs = sum("".join(c["source"]).count(STUB) for c in learner if c["cell_type"] == "code")
    shown_stubs = sum(c.count(STUB) for c in code)  # a solution may show a stub on purpose (notebook 00)
    assert n_solutions > 0 and n_stubs - shown_stubs == n_solutions


def test_strip_solutions_replaces_blocks_at_their_indentation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\nflag()  # solutions only\nprint(f)"
    assert strip_solutions(src) == f"def f(x):\n    # YOUR CODE HERE\n    {STUB}\nprint(f)"
    with pytest.raises(ValueError, match="without"):
        strip_solutions("### BEGIN SOLUTION\nx = 1")


# ----------------------------------------------------------------------------- course.check
def _double(x):
    return x * 2


def _stub(x):
    raise NotImplementedError("exercise")


def _wrong(x):
    return x * 2 + 1e-3


CASES = [torch.randn(5), torch.randn(3, 4)]


def test_check_returns_the_candidate_when_it_matches(capsys):
    assert course.check(_double, _double, CASES) is _double
    assert "2/2 cases match" in capsys.readouterr().out


def test_check_continues_with_the_reference_when_not_attempted(capsys):
    assert course.check(_stub, _double, CASES) is _double
    assert "not attempted" in capsys.readouterr().out


def test_check_fails_loudly_on_a_wrong_answer():
    with pytest.raises(course.CheckFailed, match=r"case 1/2 .*max \|err\| 0\.001"):
        course.check(_wrong, _double, CASES)
    with pytest.raises(course.CheckFailed, match="shape"):
        course.check(lambda x: x.flatten(), _double, [torch.randn(2, 2)])


def test_check_sees_a_stub_kernel_it_is_told_about(capsys):
    # on a GPU a `raise` inside a kernel is ignored: `uses=` lets check see the stub in the source
    assert course.is_stub(_stub) and not course.is_stub(_double)
    assert course.check(_double, _double, CASES, uses=(_stub,)) is _double
    assert "not attempted" in capsys.readouterr().out


def test_solution_notebooks_make_an_unattempted_exercise_fail():
    course.require_solutions()
    try:
        with pytest.raises(course.CheckFailed, match="still a stub"):
            course.check(_stub, _double, CASES)
    finally:
        course.require_solutions(False)
