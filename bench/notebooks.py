"""Execute every notebook (learner and solution versions) as CI does, and record what ran: per notebook its
seconds and how many cells passed, failed or were skipped.

    python -m bench.notebooks                     # writes bench/results/00_notebooks_<cpu|cuda>.json
    python -m bench.notebooks --workers 8 --out DIR [--log FILE]   # FILE: pytest's whole output

The same nbval run as ``make test`` (``--nbval-lax --nbval-current-env``); on a GPU machine every notebook's
``env.on_gpu`` branches run: the kernels on the GPU, bf16, live timings. Not a benchmark of speed: a record
of which notebooks execute where, and how long each took (wall time of its cells; notebooks run in parallel).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from bench._harness import RESULTS, save
from minivllm.config import GPU_MEMORY_UTILIZATION_ENV, default_gpu_memory_utilization

ROOT = Path(__file__).resolve().parents[1]


def summarize(junit_xml: Path) -> dict[str, dict]:
    """Per notebook (``notebooks/NN_x.ipynb``): seconds, cells passed / failed / skipped, failing cells."""
    rows: dict[str, dict] = defaultdict(lambda: {"seconds": 0.0, "passed": 0, "failed": 0, "skipped": 0,
                                                 "failing_cells": []})
    for case in ET.parse(junit_xml).iter("testcase"):
        folder, _, name = case.get("classname", "").partition(".")
        row = rows[f"{folder}/{name}"]
        row["seconds"] += float(case.get("time", 0))
        if case.find("failure") is not None or case.find("error") is not None:
            row["failed"] += 1
            row["failing_cells"].append(case.get("name"))
        elif case.find("skipped") is not None:
            row["skipped"] += 1
        else:
            row["passed"] += 1
    for row in rows.values():
        row["seconds"] = round(row["seconds"], 1)
        row["ok"] = row["failed"] == 0 and row["passed"] > 0
    return dict(sorted(rows.items()))


def notebook_share(workers: int) -> float:
    """Each notebook's engines' share of the GPU when ``workers`` notebooks run at once: this process's own share
    ($MINIVLLM_GPU_MEMORY_UTILIZATION, as a pytest-xdist worker of a test run sets it; else 0.8) split evenly.
    (Left to the workers' own conftest, each would inherit a share meant for one process.)"""
    own = default_gpu_memory_utilization() if os.environ.get(GPU_MEMORY_UTILIZATION_ENV, "").strip() else 0.8
    return own / workers


def run(workers: int, log: Path | None = None) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "notebooks.xml"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "notebooks", "solutions", "--nbval-lax",
               "--nbval-current-env", "--nbval-cell-timeout=300", f"--junitxml={junit}", "-q"]
        env = dict(os.environ)
        if workers > 1:
            cmd += ["-n", str(workers), "--dist", "loadscope"]
            env[GPU_MEMORY_UTILIZATION_ENV] = f"{notebook_share(workers):.3f}"
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        notebooks = summarize(junit)
    if log is not None:  # every failing cell's traceback (the JSON keeps the last 3,000 characters)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "workers": workers,
            "pytest_returncode": proc.returncode, "num_notebooks": len(notebooks),
            "all_passed": proc.returncode == 0 and all(r["ok"] for r in notebooks.values()),
            "notebooks": notebooks, "pytest_tail": proc.stdout[-3000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=8, help="notebooks executed at once (pytest-xdist)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--log", type=Path, default=None, help="also write pytest's whole output here")
    args = p.parse_args(argv)
    data = run(args.workers, args.log)
    path = save(f"00_notebooks_{data['device']}", data, args.out)
    for name, row in data["notebooks"].items():
        print(f"{name:40s} {row['seconds']:6.1f} s  {'ok' if row['ok'] else 'FAILED ' + ','.join(row['failing_cells'])}")
    print(f"{data['num_notebooks']} notebooks, all passed: {data['all_passed']} -> {path}")
    return 0 if data["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
