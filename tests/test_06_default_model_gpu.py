"""Phase 06 on a GPU: the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) through ``LLM`` in bf16.

The GGUF loader dequantizes each tensor to fp32 on the CPU and copies it into parameters made on the
engine's device and dtype (``weights.load_weights``: ``target.copy_``), so the same loader serves both
machines. Answer keys: the fp32 CPU engine's greedy tokens for the first few steps (bf16 rounding may
change later ones), and the known answer "Paris". Skipped without a GPU.
"""

import pytest
import torch

from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.mark.gpu
def test_default_model_through_llm_on_a_gpu_in_bf16_with_cuda_graphs():
    gpu = LLM()  # defaults on a GPU: cuda, bf16, decode in CUDA graphs
    model = gpu.engine.model
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    answer = gpu.chat(QUESTION, GREEDY, use_tqdm=False)[0].outputs[0]
    assert "Paris" in answer.text, answer.text
    cpu = LLM(device="cpu", dtype="float32").chat(QUESTION, GREEDY, use_tqdm=False)[0].outputs[0]
    assert answer.token_ids[:4] == cpu.token_ids[:4], (answer.text, cpu.text)
