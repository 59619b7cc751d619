"""On a GPU machine: every notebook, learner and solution, executes with its GPU branches taken.

The same nbval run as CI (``bench/notebooks.py``), which also writes what ran (seconds and cells per
notebook) to bench/results/00_notebooks_cuda.json. Skipped without a GPU: CI runs the notebooks on the CPU.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
def test_every_notebook_executes_on_the_gpu():
    from bench.notebooks import run

    data = run(workers=8)
    expected = len(list((ROOT / "solutions").glob("*.ipynb"))) + len(list((ROOT / "notebooks").glob("*.ipynb")))
    failed = {name: row["failing_cells"] for name, row in data["notebooks"].items() if not row["ok"]}
    assert data["device"] == "cuda" and data["num_notebooks"] == expected
    assert not failed, f"notebooks that failed on the GPU: {failed}\n{data['pytest_tail']}"
