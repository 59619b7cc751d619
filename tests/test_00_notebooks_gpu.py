"""On a GPU machine: every notebook, learner and solution, executes with its GPU branches taken.

The same nbval run as CI (``bench/notebooks.py``), which also writes what ran (seconds and cells per
notebook) to bench/results/00_notebooks_cuda.json. Skipped without a GPU: CI runs the notebooks on the CPU.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def notebooks_in_this_run(items) -> list[str]:
    """The notebooks this pytest session executes itself (``make test`` collects tests, notebooks and solutions)."""
    return sorted({str(item.path) for item in items if str(item.path).endswith(".ipynb")})


@pytest.mark.gpu
def test_every_notebook_executes_on_the_gpu(request):
    """Skipped where this session runs the notebooks itself (``make test`` on a GPU machine): they execute on the
    GPU there already, and a second run of every notebook, 8 at once, beside them would only crowd the GPU."""
    if notebooks_in_this_run(request.session.items):
        pytest.skip("this session executes the notebooks itself, on the GPU")
    from bench.notebooks import run

    data = run(workers=8)
    expected = len(list((ROOT / "solutions").glob("*.ipynb"))) + len(list((ROOT / "notebooks").glob("*.ipynb")))
    failed = {name: row["failing_cells"] for name, row in data["notebooks"].items() if not row["ok"]}
    assert data["device"] == "cuda" and data["num_notebooks"] == expected
    assert not failed, f"notebooks that failed on the GPU: {failed}\n{data['pytest_tail']}"


def test_the_gpu_run_of_every_notebook_knows_when_the_session_runs_them_itself():
    class Item:
        def __init__(self, path):
            self.path = Path(path)

    assert notebooks_in_this_run([Item("tests/test_x.py"), Item("tests/test_y.py")]) == []
    assert notebooks_in_this_run([Item("tests/test_x.py"), Item("notebooks/03_rmsnorm.ipynb"),
                                  Item("notebooks/03_rmsnorm.ipynb")]) == ["notebooks/03_rmsnorm.ipynb"]
