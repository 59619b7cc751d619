"""Building what the engine runs: the model and tokenizer a config names, and how many KV blocks fit.

``LLMEngine.__init__`` calls these once; each returns values, nothing is written back into the config.

Left out: downloading checkpoints (local paths only). A tensor-parallel engine loads its shards through
``minivllm.distributed`` instead (``LLMEngine``, ``tensor_parallel_size > 1``).
"""

import torch

from minivllm.cache import blocks_for_budget, gpu_kv_budget
from minivllm.config import EngineConfig


def load_model_and_tokenizer(config: EngineConfig):
    """The model (with weights) and its tokenizer; a ``ModelConfig`` gives random weights and no tokenizer."""
    from minivllm.model import GGUFFile, ModelConfig, Qwen3ForCausalLM, load_model, resolve_model_path
    from minivllm.tokenizer import Tokenizer

    device, dtype = config.torch_device, config.torch_dtype
    if isinstance(config.model, ModelConfig):
        model = Qwen3ForCausalLM(config.model, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(config.seed)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        return _fast(model.eval(), config), None
    path = resolve_model_path(config.model)
    if path.is_dir():  # a checkpoint without tokenizer.json still runs, on token ids
        tokenizer = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
        return _fast(load_model(path, device=device, dtype=dtype, progress=False), config), tokenizer
    file = GGUFFile(path)
    return _fast(load_model(file, device=device, dtype=dtype, progress=False), config), Tokenizer.from_gguf(file)


def _fast(model, config: EngineConfig):
    """The model's linear layers as ``config.quantization_method`` asks (fp16 fbgemm linears on a CPU by default)."""
    from minivllm.model.quant import quantize_model

    quantize_model(model, config.quantization_method)
    return model


def num_kv_blocks(config: EngineConfig, model, max_model_len: int, baseline=None) -> int:
    """``config.num_kv_blocks``, or what the memory budget holds: on a GPU what a profiling forward pass
    of the largest step leaves of ``gpu_memory_utilization`` (this engine's own share when ``baseline``, the GPU's
    memory when the engine began, is given: ``minivllm.cache.gpu_kv_budget``); on a CPU ``kv_cache_memory`` bytes."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    device, dtype = config.torch_device, config.torch_kv_cache_dtype
    if device.type == "cuda":
        tokens = min(config.scheduler_config.max_num_batched_tokens, max_model_len)

        def profile():  # the largest prefill step the scheduler may plan, and the logits of max_num_seqs rows
            ids = torch.zeros(tokens, dtype=torch.long, device=device)
            hidden = model(ids, torch.arange(tokens, device=device))
            model.compute_logits(hidden[: config.max_num_seqs])

        budget = gpu_kv_budget(device, config.gpu_memory_utilization, profile, baseline)
    else:
        budget = config.kv_cache_memory
    return blocks_for_budget(model.config.kv_shape, budget, dtype, config.block_size)
