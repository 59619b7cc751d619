"""Test set-up: choose numba's backend (the CUDA simulator when there is no GPU) before numba loads.

The kernels of notebooks run by nbval inherit this environment. The summary at the end lists how
long each notebook took, since every notebook must stay well under a minute on a 2-core CPU.
"""

import collections
import json
import os
import sys

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
    # Likewise the GPU: each engine takes its own share of the device (gpu_memory_utilization, default 0.9), so one
    # worker's engine at 0.9 left the other worker's engines nothing (H100, pytest -n 2: "no GPU memory is left for
    # the KV cache ... the rest of the GPU holds 78.8 GiB"). Each worker's engines, and its notebooks', share 80%.
    os.environ.setdefault("MINIVLLM_GPU_MEMORY_UTILIZATION",
                          f"{0.8 / int(os.environ['PYTEST_XDIST_WORKER_COUNT']):.2f}")

import pytest

from kernels._env import configure_numba

configure_numba()

_notebook_seconds: dict[str, float] = collections.defaultdict(float)


@pytest.fixture(autouse=True)
def _seeded_per_test(request):
    """Every test starts from random states of its own, fixed by its id: a test that draws unseeded inputs gets the
    same ones on every run, whichever tests pytest-xdist ran before it in the same worker."""
    import random
    import zlib

    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    if "torch" in sys.modules:  # tests that never import torch do not pay for it here
        sys.modules["torch"].manual_seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)


def _shared_dir(tmp_path_factory, name: str):
    """A folder every pytest-xdist worker of this run sees (their base temps share a parent), else this process's."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


def _built_once(tmp_path_factory, name: str, build, load):
    """``load(folder)`` of a folder that ``build(folder)`` fills once per test run: the first worker to get here
    builds it while the others wait on the lock, then each loads it."""
    import fcntl

    folder = _shared_dir(tmp_path_factory, name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / "done").touch()
    return load(folder)


@pytest.fixture(scope="session")
def hf_default_model(tmp_path_factory):
    """``transformers``' model of the embedded default model, fp32 on the CPU, as its own GGUF loader gives it.
    That loader takes ~30 s (gguf-py parses the file twice); the answer keys of several test files need it, so
    it runs once per test run and is kept as its config and fp32 state dict (``torch.save``: exact) for the rest."""
    import torch
    transformers = pytest.importorskip("transformers")
    from minivllm.default_model import default_model_path

    def build(folder):  # (transformers will not save_pretrained a model it loaded from GGUF: its weights and config)
        path = default_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (folder / "config.json").write_text(json.dumps(config))
        model.generation_config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "weights.pt")

    def load(folder):
        data = json.loads((folder / "config.json").read_text())
        config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(torch.load(folder / "weights.pt", mmap=True))
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
        return model.eval()

    return _built_once(tmp_path_factory, "hf_default_model", build, load)


@pytest.fixture(scope="session")
def hf_default_tokenizer(tmp_path_factory):
    """``transformers``' tokenizer of the default model from the same GGUF file, built once per run (as above)."""
    transformers = pytest.importorskip("transformers")
    from minivllm.default_model import default_model_path

    def build(folder):
        path = default_model_path()
        transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)

    return _built_once(tmp_path_factory, "hf_default_tokenizer", build, transformers.AutoTokenizer.from_pretrained)


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
