"""Issue 14: the block-weight (Q4_1 / Q8_0) linears of the CPU fast path, each against an independent answer.

* the numba kernels (``minivllm.model.q4``) against ``F.linear`` with the weight dequantized by torch ops, on
  random shapes (ragged row and output counts) and the default model's real shapes;
* quantization itself: the error bound of a block format, and the round trip that makes the embedded GGUF's
  weights exact (a dequantized block weight quantizes back to itself);
* ``BlockLinear``'s rules: which weights get blocks, and the row count that switches to fbgemm fp16;
* ``q4_decode.BlockDecoder`` (a decode step as numba calls) against the model's module path on a paged cache;
* the embedded model on the q4 path (the CPU default) answering "Paris".

No timings here: speed is measured by ``python -m bench.cpu_fast``.
"""

import pytest
import torch
import torch.nn.functional as F

from minivllm.model.q4 import BLOCK, BlockWeight, exact_blocks
from minivllm.model.quant import BlockLinear, quantize_model


def _weight(out: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05 + torch.randn(out, 1, generator=g) * 0.01


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (got - ref).abs()
    worst = int(err.argmax())
    row, col = divmod(worst, ref.shape[1])
    bound = 1e-5 * ref.abs().max().item() + 1e-6  # fp32 sums in another order
    assert err.max().item() <= bound, (f"{what}: row {row}, output {col}: got {got[row, col].item():.6g}, expected "
                                       f"{ref[row, col].item():.6g} (|diff| {err.max().item():.3g} > {bound:.3g})")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out, inp, rows", [(32, 32, 1), (40, 64, 3), (96, 96, 2), (7, 160, 5)])
def test_block_matmul_equals_f_linear_on_the_dequantized_weight(bits, out, inp, rows):
    w = _weight(out, inp, seed=out + inp + bits)
    blocks = BlockWeight(w, bits)
    x = torch.randn(rows, inp, generator=torch.Generator().manual_seed(rows))
    y = blocks.matmul(x)
    assert y.shape == (rows, out) and y.dtype == torch.float32
    _close(y, F.linear(x, blocks.dequantize()), f"Q{bits} {out}x{inp}, {rows} rows")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_error_is_at_most_half_a_step(bits):
    w = _weight(64, 128, seed=bits)
    blocks = BlockWeight(w, bits)
    dq = blocks.dequantize()
    wb = w.reshape(64, -1, BLOCK)  # (out, blocks, 32)
    step = (wb.amax(-1) - wb.amin(-1)) / 15 if bits == 4 else wb.abs().amax(-1) / 127  # (out, blocks)
    err = (dq - w).abs().reshape(64, -1, BLOCK).amax(-1)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert 0.25 < blocks.max_error <= 0.5 + 1e-4  # in steps: a float weight is not blocks
    assert blocks.max_error == pytest.approx((err / step).max().item(), rel=1e-3)


@pytest.mark.parametrize("bits, kind", [(4, "Q4_1"), (8, "Q8_0")])
def test_block_weights_quantize_back_to_themselves(bits, kind):
    """What makes the GGUF path exact: a weight made of blocks (as the loader's dequantized Q4_1/Q8_0 tensors are)
    is found to be one, and its blocks hold the same values."""
    dq = BlockWeight(_weight(96, 64, seed=bits), bits).dequantize()
    again = exact_blocks(dq)
    assert again is not None and again.kind == kind
    torch.testing.assert_close(again.dequantize(), dq, rtol=0, atol=1e-6 * dq.abs().max().item())  # fp32 rounding
    assert exact_blocks(_weight(96, 64, seed=9)) is None  # a float weight is neither: it keeps fp16
    assert exact_blocks(BlockWeight(_weight(96, 64, seed=1), 4).dequantize()[:, :48]) is None  # 48 % 32 != 0


def test_real_shapes_of_the_default_model():
    # SmolLM2-135M: qkv (9 + 2 * 3 heads of 64), o, gate_up (2 x 1536), down; the tied LM head is Q8_0 (49152 x 576)
    for i, (out, inp) in enumerate([(960, 576), (576, 576), (3072, 576), (576, 1536)]):
        blocks = BlockWeight(_weight(out, inp, seed=i), 4)
        x = torch.randn(1, inp)
        _close(blocks.matmul(x), F.linear(x, blocks.dequantize()), f"Q4_1 {out}x{inp}")
    head = BlockWeight(_weight(49152, 576, seed=7), 8)
    x = torch.randn(2, 576)
    _close(head.matmul(x), F.linear(x, head.dequantize()), "Q8_0 head 49152x576")


def test_block_linear_runs_the_kernel_up_to_max_rows_then_fbgemm(monkeypatch):
    layer = BlockLinear(BlockWeight(_weight(64, 96, seed=3), 4).dequantize())
    assert layer.blocks is not None and layer.blocks.kind == "Q4_1"
    calls = []
    matmul = layer.blocks.matmul
    monkeypatch.setattr(layer.blocks, "matmul", lambda x: calls.append(x.shape[0]) or matmul(x))
    for rows in range(1, layer.max_rows + 3):
        x = torch.randn(rows, 96)
        kernel = rows <= layer.max_rows  # else fbgemm, with the weight rounded to fp16
        ref = F.linear(x, layer.dequantized_weight() if kernel else layer.fp16.dequantized_weight())
        _close(layer(x), ref, f"BlockLinear, {rows} rows")
    assert calls == list(range(1, layer.max_rows + 1))  # the kernel for 1..max_rows rows, fbgemm beyond
    plain = BlockLinear(_weight(64, 96, seed=4))  # not blocks: always fbgemm fp16
    assert plain.blocks is None and "blocks=none" in repr(plain)


def test_quantize_model_q4_on_a_model_made_of_blocks():
    from minivllm.model.qwen3 import Linear

    model = _block_model()
    with torch.inference_mode():
        ids, pos = torch.randint(0, 128, (1,)), torch.arange(1)
        ref = model.compute_logits(model(ids, pos))
        quantize_model(model, "q4")
        layers = [m for m in model.modules() if isinstance(m, BlockLinear)]
        assert not any(isinstance(m, Linear) for m in model.modules())
        assert sorted({m.blocks.kind for m in layers}) == ["Q4_1", "Q8_0"]  # layers Q4_1, the tied head Q8_0
        got = model.compute_logits(model(ids, pos))  # one token: every linear on the block kernels
    _close(got, ref, "q4 model logits vs fp32")


def _block_model(tied: bool = True, qk_norm: bool = True):
    """A tiny model whose linears are blocks (as a Q4_1 GGUF's are once loaded), swapped to q4."""
    from minivllm.model.config import ModelConfig
    from minivllm.model.qwen3 import Qwen3ForCausalLM

    mc = ModelConfig(architecture="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                     tie_word_embeddings=tied, qk_norm=qk_norm)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(mc)
    with torch.inference_mode():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(BlockWeight(torch.randn_like(p) * 0.05, 8 if "embed" in name else 4).dequantize())
    return model


@pytest.mark.parametrize("qk_norm,seqs", [(True, 2), (False, 2), (True, 5)])
def test_block_decoder_equals_the_module_path(qk_norm, seqs):
    """q4_decode.BlockDecoder against the model's own forward on a paged cache: a 5-token prefill per sequence,
    then two decode steps of all of them (5 rows: past BlockLinear.max_rows, the decoder's matmuls are fbgemm's);
    the hidden states and the K/V it stores must match."""
    from minivllm.cache.kv_cache import PagedKVCache
    from minivllm.model.paged_attention import PagedAttentionMetadata

    model = quantize_model(_block_model(qk_norm=qk_norm), "q4")
    decoder = model.block_decoder
    assert decoder is not None
    cache = PagedKVCache.allocate(model.config.kv_shape, 2 * seqs, block_size=4)
    tables = torch.arange(2 * seqs, dtype=torch.int32).reshape(seqs, 2)  # sequence s: blocks 2s, 2s + 1 (8 slots)

    def meta(slots, lens, decodes, query_lens=()):
        return PagedAttentionMetadata(cache, torch.tensor(slots), tables[: len(lens)],
                                      torch.tensor(lens, dtype=torch.int32), decodes, max(lens), list(query_lens),
                                      list(lens)[decodes:], backend="auto")

    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        prompt = torch.randint(0, 128, (5 * seqs,), generator=g)  # 5 tokens each, slots 8s .. 8s + 4
        prefill = meta([8 * s + i for s in range(seqs) for i in range(5)], [5] * seqs, 0, [5] * seqs)
        model(prompt, torch.arange(5).repeat(seqs), prefill)
        for step in range(2):
            ids, pos = torch.randint(0, 128, (seqs,), generator=g), torch.tensor([5 + step] * seqs)
            m = meta([8 * s + 5 + step for s in range(seqs)], [6 + step] * seqs, seqs)
            assert decoder.accepts(ids, m) and not decoder.accepts(prompt, prefill)
            before = [t.clone() for t in cache.kv]
            model.block_decoder = None  # the module path, even once Qwen3ForCausalLM.forward hands steps to it
            ref = model(ids, pos, m)
            model.block_decoder = decoder
            ref_kv = [t.clone() for t in cache.kv]
            for t, b in zip(cache.kv, before):
                t.copy_(b)
            got = decoder(ids, pos, m)
            _close(got, ref, f"decode step {step}, hidden states")
            for layer, (a, b) in enumerate(zip(cache.kv, ref_kv)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"decode step {step}: KV of layer {layer}")


def test_default_model_on_the_q4_path_answers_paris():
    from minivllm import LLM, SamplingParams

    llm = LLM(device="cpu", max_model_len=256, num_kv_blocks=16)
    assert llm.engine.config.quantization_method == "q4"  # the CPU default
    kinds = [m.blocks.kind for m in llm.engine.model.modules() if isinstance(m, BlockLinear)]
    assert kinds.count("Q4_1") == 4 * 30 and kinds.count("Q8_0") == 1  # every layer exact, and the tied head
    out = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
