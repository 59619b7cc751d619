"""Test set-up: choose numba's backend (the CUDA simulator when there is no GPU) before numba loads.

The kernels of notebooks run by nbval inherit this environment. The summary at the end lists how
long each notebook took, since every notebook must stay well under a minute on a 2-core CPU.
"""

import collections
import os

# OpenMP threads that spin while waiting make a 2-thread matmul 20-60x slower when the cores are shared
# (pytest -n 2 on 2 cores); passive waiting fixes it. Set before torch loads; notebook kernels inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Even waiting passively, two workers whose every parallel region (an add, a norm) needs both cores wait on each
# other's time slices: a 150-token prefill of the default model took 2.5 s instead of 1.5 with the other core busy.
# So pytest -n N gives each worker (and the notebook kernels it starts, which inherit this) its share of the cores.
# (Set in the workers only: they start from the controller's environment, which must not pin a value first.)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)

import pytest

from kernels._env import configure_numba

configure_numba()

_notebook_seconds: dict[str, float] = collections.defaultdict(float)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.nodeid.split("::")[0].endswith(".ipynb"):
        _notebook_seconds[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if _notebook_seconds:
        terminalreporter.section("notebook times (sum of cell times)")
        for path, seconds in sorted(_notebook_seconds.items()):
            terminalreporter.write_line(f"{seconds:6.1f} s  {path}")
