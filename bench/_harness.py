"""Shared by every benchmark: where and how a result was measured, and saving it as JSON."""

import datetime as _dt
import json
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HBM_PEAK_GBPS = 4300.0  # H200: 4.8 TB/s on paper, ~4.3 TB/s reachable by a copy (shared/COURSE.md)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _command() -> str:
    """How this process was started, as a user would retype it (``python -m bench.X ...``)."""
    script = Path(sys.argv[0]).resolve()
    if script.parent == Path(__file__).resolve().parent:
        return shlex.join(["python", "-m", f"bench.{script.stem}", *sys.argv[1:]])
    return shlex.join([script.name, *sys.argv[1:]])


def meta(name: str) -> dict:
    """When, where, with what and by which command a result was produced."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "name": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "host": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "versions": {d: _version(d) for d in ("torch", "numba", "numba-cuda", "numpy", "minivllm")},
        "hbm_peak_gbps": HBM_PEAK_GBPS if gpu else None,
    }


def save(name: str, data: dict, out_dir: Path = RESULTS) -> Path:
    """Write ``{"meta": ..., **data}`` to ``<out_dir>/<name>.json`` and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"meta": meta(name), **data}, indent=1) + "\n")
    return path
