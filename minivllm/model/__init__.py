"""The Qwen3 model (and the Llama family): config, layers, attention, and weight loading.

>>> from minivllm.model import load_model
>>> model = load_model()                       # the embedded SmolLM2-135M-Instruct (GGUF)
>>> hidden = model(input_ids, positions)       # (tokens,) each -> (tokens, hidden_size)
>>> logits = model.compute_logits(hidden[-1:]) # (1, vocab_size)
>>> file = GGUFFile(path); model = load_model(file); tok = Tokenizer.from_gguf(file)  # one parse, both
"""

from minivllm.gguf_file import GGUFFile, GGUFFormatError
from minivllm.model.attention import AttentionMetadata, KVCache
from minivllm.model.config import ModelConfig, UnsupportedModelError
from minivllm.model.loader import load_config, load_model, resolve_model_path
from minivllm.model.qwen3 import Qwen3ForCausalLM
from minivllm.model.weights import WeightLoadError, checkpoint_to_param

__all__ = [
    "AttentionMetadata",
    "GGUFFile",
    "GGUFFormatError",
    "KVCache",
    "ModelConfig",
    "Qwen3ForCausalLM",
    "UnsupportedModelError",
    "WeightLoadError",
    "checkpoint_to_param",
    "load_config",
    "load_model",
    "resolve_model_path",
]
