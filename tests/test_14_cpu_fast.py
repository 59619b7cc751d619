"""Issue 14: the CPU fast path, each piece against an independent answer.

* fbgemm linears (``minivllm.model.quant``) against ``F.linear`` with the weights they hold (fp16-rounded, or
  int8 dequantized), and a quantized tiny model against its fp32 self;
* the CPU paged decode kernel (``kernels.paged_attention_cpu``) against gather + SDPA;
* ``EngineConfig.quantization``'s rule (the q4 default, the block kernels, and the embedded model on it
  answering "Paris": tests/test_14_q4.py).

No timings here: speed is measured by ``python -m bench.cpu_fast``.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.paged_attention_cpu import paged_decode_cpu, paged_decode_ref
from minivllm.config import EngineConfig, default_max_num_batched_tokens
from minivllm.model.config import ModelConfig
from minivllm.model.qwen3 import Linear, Qwen3ForCausalLM
from minivllm.model.quant import Fp16Linear, Int8Linear, is_quantized, quantize_model


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_fp16_linear_is_f_linear_with_fp16_weights(rows):
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(96, 64, generator=g) * 0.05, torch.randn(rows, 64, generator=g)
    layer = Fp16Linear(w)
    assert torch.equal(layer.dequantized_weight(), w.half().float())
    torch.testing.assert_close(layer(x), F.linear(x, w.half().float()), rtol=1e-4, atol=1e-5)


def test_int8_linear_is_close_to_its_dequantized_weights():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g) * 0.05, torch.randn(8, 64, generator=g)
    layer = Int8Linear(w)
    dq = layer.dequantized_weight()
    assert (dq - w).abs().max() <= w.abs().amax(1, keepdim=True).max() / 127  # one step per row at most
    ref = F.linear(x, dq)
    assert ((layer(x) - ref).abs().max() / ref.abs().max()).item() < 0.05  # 7-bit activations, per tensor


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_quantize_model_swaps_every_linear_and_keeps_the_logits(tied, mode):
    mc = ModelConfig(architecture="qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                     tie_word_embeddings=tied, qk_norm=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(mc)
    for name, p in model.named_parameters():
        p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.05)
    ids, pos = torch.randint(0, 128, (12,)), torch.arange(12)
    with torch.inference_mode():
        ref = model.compute_logits(model(ids, pos))
        quantize_model(model, mode)
        assert is_quantized(model) and not any(isinstance(m, Linear) for m in model.modules())
        assert quantize_model(model, mode) is model  # idempotent
        got = model.compute_logits(model(ids, pos))
    tol = 1e-3 if mode == "fp16" else 0.1
    assert (got - ref).abs().max().item() < tol * ref.abs().max().item() + 1e-4
    assert got.argmax(-1).eq(ref.argmax(-1)).float().mean() >= (1.0 if mode == "fp16" else 0.5)


@pytest.mark.parametrize("lens", [[1], [1, 17, 40, 3], [64] * 5])
def test_cpu_paged_decode_equals_gather_and_sdpa(lens):
    g = torch.Generator().manual_seed(len(lens))
    bs, heads, kv_heads, d = 16, 6, 2, 32
    width = -(-max(lens) // bs)
    kv = torch.randn(len(lens) * width + 3, 2, bs, kv_heads, d, generator=g)
    tables = (torch.randperm(len(lens) * width, generator=g).reshape(len(lens), width) + 3).int()
    context = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), heads, d, generator=g)
    torch.testing.assert_close(paged_decode_cpu(q, kv, tables, context), paged_decode_ref(q, kv, tables, context),
                               rtol=1e-5, atol=1e-5)


def test_quantization_rule():
    assert EngineConfig(device="cpu").quantization_method == "q4"  # the default on a CPU: the fast path
    assert EngineConfig(device="cpu", dtype="float32").quantization_method == "none"  # asked-for dtype: exact
    assert EngineConfig(device="cpu", dtype="float32", quantization="int8").quantization_method == "int8"
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="q3")
    with pytest.raises(ValueError, match="float32"):
        EngineConfig(device="cpu", dtype="bfloat16", quantization="fp16")
    assert default_max_num_batched_tokens(torch.device("cpu"), 8) < default_max_num_batched_tokens(
        torch.device("cuda"), 8)
    assert default_max_num_batched_tokens(torch.device("cpu"), 256) == 256  # every decode fits a step
