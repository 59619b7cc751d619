"""The notebooks that drive the engine step by step, run with the overlapped loop, as a one-GPU engine runs them.

On one GPU, ``LLM()`` overlaps its steps (``EngineConfig.overlaps``: async scheduling, on by default there); CI has
no GPU, so its run of the notebooks takes the plain loop. Notebook 00's walk through the engine once read one output
per ``engine.step()``, which the overlapped loop does not give, and only a run on an H200 showed it. Here the notebooks
that call ``engine.step()`` themselves run with the overlapped loop forced on, through an IPython startup file in the
notebook's kernel (the package is not changed), and the startup file leaves a mark when it turned the loop on, so the
test knows the loop it meant to check did run.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["solutions/00_introduction.ipynb", "solutions/12_engine.ipynb"]

STARTUP = '''
from pathlib import Path

from minivllm.config import EngineConfig

_default = EngineConfig.overlaps.fget


def _as_on_one_gpu(self):  # the package's engine overlaps unless told otherwise, as on one GPU
    if self.async_scheduling is None and self.tensor_parallel_size == 1 and self.learner is False:
        Path({mark!r}).touch()
        return True
    return _default(self)


EngineConfig.overlaps = property(_as_on_one_gpu)
'''


def test_step_by_step_notebooks_run_with_the_overlapped_loop(tmp_path):
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    mark = tmp_path / "overlapped"
    (startup / "00-overlap.py").write_text(STARTUP.format(mark=str(mark)))
    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           *NOTEBOOKS, "--nbval-lax", "--nbval-current-env", "--nbval-cell-timeout=300"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"with the overlapped loop:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert mark.exists(), "the startup file never turned the overlapped loop on: the notebooks ran the plain loop"
