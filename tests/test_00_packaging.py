"""Packaging: one distribution, two import packages, and environment.yml in step with pyproject.toml."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("course", "test"):
        wanted += project["optional-dependencies"][extra]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [r for r in pip if not r.startswith("-e")]
    assert sorted(listed) == sorted(wanted), "environment.yml's pip list differs from pyproject.toml"


def test_numpy_is_pinned_below_2_5_for_numba_cuda():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    numpy = next(r for r in project["dependencies"] if _name(r) == "numpy")
    assert "<2.5" in numpy


def test_one_distribution_installs_both_packages():
    files = {str(f).split("/")[0] for f in metadata.files("minivllm") or []}
    import kernels
    import minivllm

    assert Path(kernels.__file__).parent.parent == Path(minivllm.__file__).parent.parent == ROOT
    assert metadata.version("minivllm") == minivllm.__version__
    assert files  # the dist-info records what it installed


def test_our_kernels_package_is_not_mistaken_for_the_hub_kernels_package():
    # transformers uses the PyPI project `kernels` when it finds one; ours must not look like it.
    import kernels
    from transformers.utils import import_utils

    assert kernels.MINIVLLM_KERNELS
    try:
        metadata.version("kernels")
        raise AssertionError("a distribution named `kernels` is installed")
    except metadata.PackageNotFoundError:
        pass
    assert not import_utils.is_kernels_available()
