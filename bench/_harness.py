"""Shared by every benchmark: where and how a result was measured, saving it as JSON, and the small helpers
the engine benchmarks (throughput, latency, prefix) all use."""

import argparse
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import random
import shlex
import sys
from importlib import metadata
from pathlib import Path

# OpenMP threads that sleep instead of spinning when they wait: on a shared or busy CPU (CI runs two test workers
# on two cores) spinning threads make a 2-thread matmul 20-60x slower; set before torch loads libgomp
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.models import RANDOM_MODELS  # noqa: E402
from minivllm.model.config import ModelConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HBM_PEAK_GBPS = 4300.0  # H200: 4.8 TB/s on paper, ~4.3 TB/s reachable by a copy (shared/COURSE.md)


@functools.cache
def hbm_gbps() -> float:
    """The memory bandwidth this GPU reaches, in GB/s: a device-to-device copy of 1 GiB (read + write), best
    of 10 -- the floor that bandwidth-bound kernels are measured against. Measured rather than looked up, so
    an H100 (3.35 TB/s on paper) is not held to an H200's 4.3. Without a GPU: ``HBM_PEAK_GBPS``."""
    if not torch.cuda.is_available():
        return HBM_PEAK_GBPS
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    del src, dst
    torch.cuda.empty_cache()
    return round(2 * (1 << 30) / (best * 1e6), 1)


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
        "hbm_peak_gbps": hbm_gbps() if gpu else None,  # measured: hbm_gbps()
    }


def engine_parser(description: str) -> argparse.ArgumentParser:
    """The options every engine benchmark takes: ``--device``, ``--config`` (the embedded model or a random one),
    ``--seed`` and ``--out``; each benchmark adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config", choices=["default", "qwen3-0.6b", "tiny"], default=None,
                   help="model: default (embedded SmolLM2; CPU default), qwen3-0.6b (random; GPU default), tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    return p


def save_tagged(prefix: str, data: dict, out_dir: Path = RESULTS) -> Path:
    """:func:`save` as ``<prefix>_<device>.json``, or ``<prefix>_tiny.json`` for a dry run on the tiny model."""
    return save(f"{prefix}_{'tiny' if data['config'] == 'tiny' else data['device']}", data, out_dir)


def save(name: str, data: dict, out_dir: Path = RESULTS) -> Path:
    """Write ``{"meta": ..., **data}`` to ``<out_dir>/<name>.json`` and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"meta": meta(name), **data}, indent=1) + "\n")
    return path


def kernel_bench_main(module: str, doc: str, name: str, run, argv: list[str] | None = None) -> int:
    """The command line of a GPU-only kernel benchmark (``python -m <module> [--out DIR]``): ``run()``'s data saved
    as ``<name>.json``; exit status 2 on a machine without a GPU (the simulator's timings would mean nothing)."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{module} measures a GPU kernel; this machine has no GPU", file=sys.stderr)
        return 2
    print(f"saved {save(name, run(), args.out)}")
    return 0


# ----------------------------------------------------------------------------- engine benchmarks
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no GPU here")
    if name == "cuda":
        hbm_gbps()  # measured now, on an idle GPU, for the result's meta (cached): after a long run it read 14% low
    return torch.device(name)


def model_spec(config: str | None, device: torch.device) -> tuple[str, ModelConfig | None]:
    """(name, ModelConfig of a random model or None for the embedded default model)."""
    name = config or ("qwen3-0.6b" if device.type == "cuda" else "default")
    return name, RANDOM_MODELS.get(name)


def dtype_of(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def engine_config(name: str, mc: ModelConfig | None, device: torch.device, **options) -> dict:
    """Keyword arguments of ``LLM`` for a benchmark: the model, device and dtype, plus ``options``."""
    return dict(model=mc, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32", **options)


def same_tokens(a: list[list[int]], b: list[list[int]], first: int | None = None) -> int:
    """How many requests got the same tokens (only the first ``first`` of each, if given)."""
    return sum(x[:first] == y[:first] for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the workload
