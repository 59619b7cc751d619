"""Benchmark results saved under ``bench/results/`` (JSON), for notebooks that run without a GPU."""

import json
from pathlib import Path


def results_dir() -> Path:
    """``bench/results`` of the repository this package was installed from (editable install)."""
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in start.parents:
            if (parent / "bench" / "results").is_dir():
                return parent / "bench" / "results"
    raise FileNotFoundError("bench/results not found: run notebooks from a checkout of the course")


def load_result(name: str) -> dict:
    """Load ``bench/results/<name>.json``; its ``meta`` says when, where and how it was measured."""
    path = results_dir() / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no saved result {path.name}; produce it on a GPU with `python -m bench.run` "
                                "(bench/run.py lists which benchmark writes which file)")
    return json.loads(path.read_text())
