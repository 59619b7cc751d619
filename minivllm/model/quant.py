"""The fast CPU path: linear layers that read fewer weight bytes, swapped into a loaded model.

On a CPU the model's matmuls are the step: fp32 decode at batch 1 reads ~540 MB of weights per token, and
MKL's fp32 GEMM runs at only ~12-20 GFLOP/s on the course's AMD CPUs at batch 32. Three replacements:

* :class:`BlockLinear` (``"q4"``, the CPU default): the weight as the GGUF stored it, Q4_1 blocks for the
  layers and Q8_0 for the embedding (our tied LM head), ~105 MB a token instead of 540, multiplied by the numba
  kernels of :mod:`minivllm.model.q4` for up to ``max_rows`` rows (decode), and fbgemm fp16 beyond (prefill,
  large batches). Each weight keeps the block form only if it gives the weight back exactly (so a bf16
  checkpoint's weights stay fp16, never re-quantized); the embedded model's do, bit for bit, so its logits are
  fp32's to ~1e-5. A q4 model also gets a :class:`~minivllm.model.q4_decode.BlockDecoder`, which runs a whole
  decode step of any batch as numba calls, its matmuls fbgemm's past ``max_rows`` rows (``Qwen3ForCausalLM.forward``
  hands it those steps): 2-3x the module path at batch 1 and ~1.3-1.5x at 8-32 chats, since the ~30 small torch
  ops per layer cost as much as the matmuls there (bench/results/14_cpu_fast.json).
* :class:`Fp16Linear` (``"fp16"``): weights stored as fp16 (half the bytes), activations and accumulation fp32
  (fbgemm). The GGUF's Q4_1/Q8_0 values are exact in a few bits, so the results differ from fp32 by ~2e-4
  relative. Measured (2 cores, 30 layers' weights cycled so they come from memory): 2-2.5x fp32 at batch 1,
  2.5-4x at batch 32.
* :class:`Int8Linear` (``"int8"``, opt-in): int8 weights, one scale per output row, and activations quantized
  per call to 7-bit uint8 *per tensor* (fbgemm's dynamic linear). Faster again (the LM head 5x fp32), but on
  SmolLM2 the activation outliers cost too much: 46-89% teacher-forced top-1 agreement with fp32 (see
  bench/results/14_cpu_fast.json), so it is not the default.

:func:`quantize_model` replaces, in place, every :class:`~minivllm.model.qwen3.Linear` (qkv, o, gate_up, down
and an untied lm_head) and gives a tied model a separate ``lm_head`` built from the embedding (which stays
fp32 for the token lookup). It is idempotent. What ``EngineConfig.quantization="auto"`` means is decided in
one place, ``EngineConfig.quantization_method``.

Left out: re-quantizing float weights to 4 bits (lossy: a checkpoint that is not blocks keeps fp16), GPUs
(fbgemm and the numba CPU kernels are CPU-only; a GPU runs bf16), static activation scales (SmoothQuant), and
quantizing attention or the KV cache.
"""

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn


def _quantize_rows(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) float -> a per-row symmetric qint8 tensor (scale = max |w| / 127, zero point 0)."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # (out,)
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks quantized tensor creation deprecated; fbgemm's packing needs one
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)


class Int8Linear(nn.Module):
    """``y ≈ x @ W.T`` with int8 W (per output row) and x quantized at each call; no bias."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"a linear weight is (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._packed = torch.ops.quantized.linear_prepack(_quantize_rows(weight), None)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) fp32: the weight this layer multiplies by, for checks."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (tokens, in) fp32 -> (tokens, out) fp32; reduce_range: 7-bit activations, no int16 saturation
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 (fbgemm)"


class Fp16Linear(nn.Module):
    """``y = x @ W.T`` with W kept as fp16 and packed for fbgemm; x and the accumulation stay fp32; no bias."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"a linear weight is (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) fp32: the weight this layer multiplies by (the fp16 values), for checks."""
        weight, _ = torch.ops.quantized.linear_unpack_fp16(self._packed)
        return weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)  # (tokens, in) -> (tokens, out) fp32

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weights (fbgemm)"


class BlockLinear(nn.Module):
    """``y = x @ W.T`` with W as llama.cpp-style blocks for a few rows of x, fbgemm fp16 for more.

    W is kept as the smallest block format that holds it exactly (:func:`minivllm.model.q4.exact_blocks`): Q4_1
    for the embedded GGUF's layers, Q8_0 for its embedding (our tied LM head); a weight that is neither (a
    bf16 checkpoint's) gets no blocks and always runs fp16, so this never changes a model's values. Decode
    (a few rows) reads ~1/7 of the fp32 bytes through the numba kernels; the kernels redo the unpacking for
    every row, so past ``max_rows`` rows (prefill, large batches) fbgemm's fp16 GEMM wins and runs.
    """

    max_rows = 2  # rows (tokens) up to which the block kernel runs (measured: bench/cpu_fast.py)

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        from minivllm.model.q4 import exact_blocks

        self.fp16 = Fp16Linear(weight)
        self.out_features, self.in_features = self.fp16.out_features, self.fp16.in_features
        self.blocks = exact_blocks(weight)  # a BlockWeight, or None

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) fp32: the weight the block kernel multiplies by (the fp16 one without blocks), for checks."""
        return self.blocks.dequantize() if self.blocks is not None else self.fp16.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None and x.shape[0] <= self.max_rows:
            return self.blocks.matmul(x)  # (rows, in) -> (rows, out) fp32
        return self.fp16(x)

    def extra_repr(self) -> str:
        kind = self.blocks.kind if self.blocks is not None else "none"
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocks={kind} (numba) "
                f"up to {self.max_rows} rows, fp16 (fbgemm) beyond")


LAYERS = {"fp16": Fp16Linear, "int8": Int8Linear, "q4": BlockLinear}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, tuple(LAYERS.values())) for m in model.modules())


@torch.inference_mode()
def quantize_model(model: nn.Module, quantization: str = "fp16") -> nn.Module:
    """Swap ``model``'s linear layers for fp16- or int8-weight ones, in place (``"none"``: leave it); returns it.

    ``model`` is a :class:`~minivllm.model.qwen3.Qwen3ForCausalLM` on the CPU in fp32. The runner keeps the
    same model object, so this may run after the engine has built it.
    """
    from minivllm.model.qwen3 import Linear

    if quantization == "none" or is_quantized(model):
        return model
    if quantization not in LAYERS:
        raise ValueError(f"unknown quantization {quantization!r}; expected 'none' or one of {sorted(LAYERS)}")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"{quantization} linears run on the CPU in fp32; this model is {model.dtype} on {model.device}")
    torch.backends.quantized.engine = "fbgemm"
    layer = LAYERS[quantization]
    slots = [(parent, name, child.weight) for parent in list(model.modules())
             for name, child in list(parent.named_children()) if isinstance(child, Linear)]
    if getattr(model, "lm_head", ...) is None:  # tied: logits from a packed copy; the lookup keeps fp32 rows
        slots.append((model, "lm_head", model.model.embed_tokens.weight))

    def build(weight: torch.Tensor) -> nn.Module:
        with torch.inference_mode():
            return layer(weight)

    # packing runs in C++ without the GIL: one thread a core (SmolLM2-135M's q4 layers on 2 cores: 3.7 -> 3.0 s)
    with ThreadPoolExecutor(max_workers=max(1, min(len(slots), torch.get_num_threads()))) as pool:
        for (parent, name, _), new in zip(slots, pool.map(build, [w for _, _, w in slots])):
            setattr(parent, name, new)
    if quantization == "q4":  # decode steps as numba calls on the blocks, for Qwen3ForCausalLM.forward to take
        from minivllm.model.q4_decode import BlockDecoder

        model.block_decoder = BlockDecoder.for_model(model)  # None unless every layer's linears are blocks
    return model
