"""Load a model: a Hugging Face checkpoint directory, a GGUF file, or (no argument) the default model.

:func:`load_model` reads the config, builds :class:`~minivllm.model.qwen3.Qwen3ForCausalLM` with empty
weights directly on the target device and dtype, and streams the checkpoint into it one tensor at a
time (a tqdm bar on stderr counts them): each tensor is read (memory-mapped safetensors, or dequantized
GGUF), copied into its parameter, converted on the way, and dropped, so at no point is there a second
full copy of the model in memory.

A GGUF file may also be given already open (a :class:`~minivllm.gguf_file.GGUFFile`), so that the
tokenizer (``Tokenizer.from_gguf``) and the model share one parse of it.

Defaults: on a machine with a CUDA GPU the model goes there in bf16; otherwise it stays on the CPU in
fp32. Left out: ``pytorch_model.bin`` checkpoints (pickles), downloading from the Hugging Face hub.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from minivllm.gguf_file import GGUFFile
from minivllm.model.config import ModelConfig
from minivllm.model.gguf_loader import Part, read_gguf
from minivllm.model.qwen3 import Qwen3ForCausalLM

ModelPath = str | os.PathLike | None


def resolve_model_path(model: ModelPath = None) -> Path:
    """``None`` -> the embedded default model's GGUF file; otherwise the path, which must exist."""
    if model is None:
        from minivllm.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a checkpoint directory or a .gguf file")
        return path
    raise FileNotFoundError(f"model {str(model)!r} does not exist (give a checkpoint directory or a .gguf file)")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU (half the memory traffic, tensor cores); fp32 on a CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's ``*.safetensors`` shards (those of ``model.safetensors.index.json`` if present)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files (pytorch_model.bin is not supported)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: shards named in the index are missing: {', '.join(missing)}")
    return files


def iter_safetensors(files: list[Path], part: Part | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, read one at a time from the memory-mapped file;
    with ``part``, only the rows and columns it names of each 2-D tensor are read."""
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if part is None:
                    yield name, f.get_tensor(name)
                    continue
                lazy = f.get_slice(name)
                wanted = part(name) if len(lazy.get_shape()) == 2 else None
                yield name, lazy[wanted] if wanted is not None else lazy[:]


def _count_safetensors(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            total += len(f.keys())
    return total


def load_config(model: ModelPath | GGUFFile = None) -> ModelConfig:
    """The config of a checkpoint directory or GGUF file (a path or an open one), without loading weights."""
    if isinstance(model, GGUFFile):
        return read_gguf(model)[0]
    path = resolve_model_path(model)
    if path.is_dir():
        return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    return read_gguf(path)[0]


def read_checkpoint(model: ModelPath | GGUFFile = None,
                    part: Part | None = None) -> tuple[ModelConfig, int, Iterator[tuple[str, torch.Tensor]]]:
    """A checkpoint directory or GGUF file: its config, its number of tensors, and a stream of (HF name, tensor)
    read one at a time (what :func:`load_model` copies in). ``part(name) -> (rows, columns)`` reads only that
    slice of each 2-D tensor (a tensor-parallel rank's: ``minivllm.distributed.sharding``)."""
    if isinstance(model, GGUFFile):
        return read_gguf(model, part)
    path = resolve_model_path(model)
    if path.is_dir():
        config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        files = safetensors_files(path)
        return config, _count_safetensors(files), iter_safetensors(files, part)
    return read_gguf(path, part)


def load_model(model: ModelPath | GGUFFile = None, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, progress: bool = True) -> Qwen3ForCausalLM:
    """Build the model of ``model`` (directory, ``.gguf`` path, open ``GGUFFile``, or None for the default)
    with its weights."""
    path = model.path if isinstance(model, GGUFFile) else resolve_model_path(model)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but PyTorch sees no CUDA GPU here")
    dtype = dtype or default_dtype(device)
    config, total, weights = read_checkpoint(model)
    model = Qwen3ForCausalLM(config, device=device, dtype=dtype)
    bar = tqdm(weights, total=total, desc=f"loading {path.name}", unit=" tensors", disable=not progress, leave=False)
    model.load_weights(bar)
    return model.eval()
