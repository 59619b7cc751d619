"""``EngineConfig``: every knob of the engine, validated once, frozen, read by each component.

Config flows one way: ``LLM(model, **kwargs)`` -> ``EngineConfig(**kwargs)`` -> the scheduler, the
runner and the KV cache read what they need. Values only known once the model is loaded (the KV block
count, the EOS ids, the context length) live on the engine, set in one place
(:meth:`minivllm.engine.LLMEngine.__init__`), not written back here.

Left out: pipeline parallelism, quantization beyond the CPU's fp16/int8/Q4_1/Q8_0 linears, LoRA, speculative
decoding, swap space.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # NOTE: not imported at run time: the scheduler reads this module and loads no model code
    from minivllm.model.config import ModelConfig

ATTENTION_BACKENDS = ("auto", "numba", "torch")
QUANTIZATIONS = ("auto", "none", "fp16", "int8", "q4")  # see EngineConfig.quantization_method
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names: "auto" = the model's dtype; fp8 = e4m3 (kernels._fp8)
# A CPU step's token budget: a token costs ~0.27 GFLOP and 2 cores run the fast path's GEMMs at ~50 GFLOP/s, so
# ~64 tokens (decodes first, then prefill chunks) keep a step near 0.5 s and a long prompt cannot freeze the other
# streams: beside 8 decoding chats and a 4k prompt, 64 gave a 0.38 s longest gap, 2048 gave 7.5 s
# (bench/results/14_cpu_fast.json; 128 gave 3.4 s under a load average of 4-5).
CPU_MAX_NUM_BATCHED_TOKENS = 64


GPU_MEMORY_UTILIZATION_ENV = "MINIVLLM_GPU_MEMORY_UTILIZATION"


def default_gpu_memory_utilization() -> float:
    """The engine's share of the GPU when none is given: ``$MINIVLLM_GPU_MEMORY_UTILIZATION``, else 0.9.

    Several engines on one GPU (two notebooks' kernels, the workers of ``pytest -n 2``, a server beside a notebook)
    each take their own share, so at 0.9 the first one leaves the next nothing; setting the variable once sizes every
    engine started from that environment (notebook kernels and subprocesses inherit it)."""
    raw = os.environ.get(GPU_MEMORY_UTILIZATION_ENV, "").strip()
    if not raw:
        return 0.9
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:  # (NaN fails this too)
        raise ValueError(f"${GPU_MEMORY_UTILIZATION_ENV} must be a number in (0, 1], got {raw!r}")
    return value


def default_max_num_batched_tokens(device: torch.device, max_num_seqs: int) -> int:
    """The token budget when none is given: 2048 on a GPU; on a CPU, CPU_MAX_NUM_BATCHED_TOKENS (>= max_num_seqs)."""
    return 2048 if device.type == "cuda" else max(CPU_MAX_NUM_BATCHED_TOKENS, max_num_seqs)


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    """The scheduler's knobs. ``EngineConfig.scheduler_config`` derives it; its defaults are the engine's."""

    max_num_batched_tokens: int = 2048  # the token budget of one step (decodes + prefill chunks)
    max_num_seqs: int = 64  # at most this many running sequences (so at most this many per step)
    block_size: int = 16  # token slots per KV block
    enable_prefix_caching: bool = True  # reuse cached prompt prefixes at admission

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence's decode token must fit in one step")


_S = SchedulerConfig()
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # what to run
    model: "str | Path | ModelConfig | None" = None  # a checkpoint directory, a .gguf, None = the embedded default;
    #                                               a ModelConfig builds a random-weight model (benchmarks)
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on a GPU, float32 on a CPU
    quantization: str = "auto"  # "auto": "q4" on a CPU when dtype is "auto", else "none"; so dtype="float32"
    #                             given explicitly is the exact fp32 path. "q4": weights that are exactly Q4_1/Q8_0
    #                             blocks (a GGUF's) through numba kernels for decode, fbgemm fp16 otherwise; "fp16":
    #                             fbgemm fp16-weight linears; "int8": fbgemm int8 linears with dynamic activations
    #                             (less exact); CPU only. See quantization_method and minivllm.model.quant.
    seed: int = 0  # random weights (ModelConfig) and the sampler's shared generator
    max_model_len: int | None = None  # longest prompt + output; None: the model's max positions
    # scheduling (see minivllm.scheduler)
    max_num_seqs: int = _S.max_num_seqs  # sequences in flight at once
    max_num_batched_tokens: int | None = None  # tokens computed per step (decodes + prefill chunks); None: 2048 on
    #                                            a GPU, CPU_MAX_NUM_BATCHED_TOKENS on a CPU (a long prompt's chunks
    #                                            leave a decode step every few tenths of a second: bench/cpu_fast.py)
    block_size: int = _S.block_size  # tokens per KV block
    enable_prefix_caching: bool = _S.enable_prefix_caching  # reuse cached prompt prefixes (radix cache)
    # KV cache size: GPU -> this engine's share gpu_memory_utilization of the device (at most what is free:
    # minivllm.cache.kv_budget); CPU -> kv_cache_memory bytes;
    # num_kv_blocks overrides both (tests force preemption with a tiny pool). Default 0.9, or
    # $MINIVLLM_GPU_MEMORY_UTILIZATION (default_gpu_memory_utilization: several engines on one GPU)
    gpu_memory_utilization: float = field(default_factory=default_gpu_memory_utilization)
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8" (= "fp8_e4m3"): K and V stored as e4m3 bytes,
    #                               half of bf16's, so decode reads half the bytes and twice the tokens fit (lossy:
    #                               3 mantissa bits, no scales). vLLM's --kv-cache-dtype. bf16 models on a GPU, or CPU
    kv_cache_memory: int = 512 * 2**20
    num_kv_blocks: int | None = None
    # execution
    attention_backend: str = "auto"  # "auto": the fastest correct one per phase; "numba": our kernels; "torch"
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    cuda_graph_max_batch: int = 256  # decode steps up to this batch replay a captured graph
    cuda_graph_max_tokens: int = 8192  # prefill and mixed steps up to this many tokens replay piecewise graphs
    #                                    (minivllm.piecewise; capped at max_num_batched_tokens, so 2048 unless that is
    #                                    raised); 0: they run eagerly. At 8192 the offline workload's prefill steps (up
    #                                    to 8192 tokens) wait less on the host: H100, A/B/A/B, 18,270 and 18,002 tok/s
    #                                    against 17,364 and 17,511 with 2048 (bench/results/h100/
    #                                    12_throughput_cuda_pw*.json); ~5 s more capture at start-up
    async_scheduling: bool | None = None  # overlap: plan and prepare decode step N+1 while step N runs, output
    #                                 processing behind the device too (minivllm.overlap; not with tensor
    #                                 parallelism). vLLM's --async-scheduling, on by default since vLLM 0.14.
    #                                 None: on for one GPU (H100, session 11: the same tokens, batch-1 decode 1.31
    #                                 against 1.54 ms/token), off on a CPU (nothing runs beside the host there) and
    #                                 with tensor parallelism. ``overlaps`` is the resolved choice
    # the course: True (or a workspace folder) builds the engine from the learner's passed components
    learner: bool | str | Path = False  # see minivllm.learner; default folder notebooks/workspace
    # tensor parallelism (minivllm.distributed): the model's heads, MLP and vocabulary split over this many ranks,
    # rank 0 in this process and one worker process per other rank (gloo on a CPU, NCCL on cuda:0..N-1)
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        self.scheduler_config  # validates the scheduling knobs (max_num_seqs, max_num_batched_tokens, block_size)
        if not isinstance(self.cuda_graph_max_batch, int) or isinstance(self.cuda_graph_max_batch, bool) \
                or self.cuda_graph_max_batch <= 0:
            raise ValueError(f"cuda_graph_max_batch must be a positive int, got {self.cuda_graph_max_batch!r}")
        if not isinstance(self.cuda_graph_max_tokens, int) or isinstance(self.cuda_graph_max_tokens, bool) \
                or self.cuda_graph_max_tokens < 0:
            raise ValueError(f"cuda_graph_max_tokens must be an int >= 0, got {self.cuda_graph_max_tokens!r}")
        for name in ("max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        self.torch_kv_cache_dtype  # validates kv_cache_dtype against the dtype, device and learner
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        self.quantization_method  # validates quantization against the device
        if not isinstance(self.learner, bool | str | Path):
            raise ValueError(f"learner must be True/False or a workspace folder, got {self.learner!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device != "auto":
            device = torch.device(self.device)  # raises on nonsense
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} was asked for, but PyTorch sees no CUDA GPU here")
            if device.type not in ("cuda", "cpu"):
                raise ValueError(f"device must be cuda or cpu, got {self.device!r}")
        self._check_tensor_parallel()
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (auto), got {self.async_scheduling!r}")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling does not work with tensor_parallel_size > 1 yet (the workers would "
                             "need the sampled tokens of the step before)")
        if self.torch_device.type == "cuda":  # one clear message for a GPU without bf16 (a T4, a V100)
            from kernels._env import check_gpu_supported

            check_gpu_supported(self.torch_device.index or 0)

    def _check_tensor_parallel(self) -> None:
        """What can be checked before any model file is read (the heads are checked by minivllm.distributed)."""
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {tp!r}")
        if tp == 1:
            return
        if self.learner is not False:
            raise ValueError("the learner's engine runs on one device: drop tensor_parallel_size or learner")
        if self.torch_device.type == "cuda" and torch.cuda.device_count() < tp:
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs; PyTorch sees {torch.cuda.device_count()}")
        if self.torch_device.type == "cuda" and self.torch_device.index not in (None, 0):
            raise ValueError(f"with tensor parallelism rank r runs on cuda:r; give device='cuda', not {self.device!r} "
                             "(CUDA_VISIBLE_DEVICES picks the GPUs)")
        if not isinstance(self.model, str | Path | None):  # a ModelConfig: its heads are known now
            from minivllm.distributed.sharding import check_tensor_parallel_size

            check_tensor_parallel_size(self.model, tp)

    @classmethod
    def from_kwargs(cls, model: Any = None, **kwargs: Any) -> "EngineConfig":
        """``EngineConfig`` from ``LLM(...)``-style keyword arguments; unknown names are a clear error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(known - {'model'})}")
        return cls(model=model, **kwargs)

    @property
    def scheduler_config(self) -> SchedulerConfig:
        """What the scheduler reads: derived here, never written back."""
        budget = self.max_num_batched_tokens or default_max_num_batched_tokens(self.torch_device, self.max_num_seqs)
        return SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=self.max_num_seqs,
                               block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching)

    @property
    def quantization_method(self) -> str:
        """``"none"``, ``"q4"``, ``"fp16"`` or ``"int8"``: what the engine runs. ``"auto"`` means q4 on a CPU when
        the dtype was left to ``"auto"`` too, "none" on a GPU or whenever a dtype was asked for (``dtype="float32"``:
        exact)."""
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        cpu = self.torch_device.type == "cpu"
        if self.quantization == "auto":
            return "q4" if cpu and self.dtype == "auto" else "none"
        if self.quantization != "none" and not cpu:
            raise ValueError(f"quantization={self.quantization!r} runs on the CPU only (fbgemm); use device='cpu'")
        if self.quantization != "none" and self.torch_dtype != torch.float32:
            raise ValueError(f"quantization={self.quantization!r} computes in float32; drop dtype={self.dtype!r}")
        return self.quantization

    @property
    def overlaps(self) -> bool:
        """Whether the engine runs its overlapped loop: ``async_scheduling`` when given, else on for a one-GPU engine
        built from the package (a learner's engine runs the loop the learner wrote, one step at a time)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device.type == "cuda" and self.tensor_parallel_size == 1 and self.learner is False

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's element type: the model's dtype, or ``torch.float8_e4m3fn`` for ``kv_cache_dtype="fp8"``."""
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype
        if self.learner is not False:
            raise ValueError("the learner's kernels store and read K/V in the model's dtype: drop kv_cache_dtype or "
                             "learner")
        if self.torch_device.type == "cuda" and self.torch_dtype != torch.bfloat16:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} on a GPU needs a bfloat16 model (its decode "
                             f"kernel reads bf16 queries), got dtype={self.dtype!r}")
        return torch.float8_e4m3fn

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = DTYPES[self.dtype]
        if dtype is None:
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return dtype
