"""Helpers for the course notebooks: environment set-up, exercise checks, plots, saved results.

Notebooks import these instead of redefining them, so every notebook checks and plots the same way:

>>> from minivllm import course
>>> course.setup()                         # simulator if no GPU; prints what runs where
>>> add = course.check(my_add, kernels.basics.add_ref, cases)   # learner's version or the reference
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on shared cores (2-core CI)

from minivllm.course.checks import CheckFailed, attempted, check, is_stub, require_solutions  # noqa: E402
from minivllm.course.environment import Environment, setup
from minivllm.course.results import load_result, results_dir

__all__ = [
    "CheckFailed",
    "Environment",
    "attempted",
    "check",
    "is_stub",
    "load_result",
    "require_solutions",
    "results_dir",
    "setup",
]
