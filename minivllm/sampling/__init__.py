"""The sampler's parts (phase 10): ``batch`` (one step's knobs as tensors) and ``filters`` (the tensor ops).

The sampler itself is :class:`minivllm.sampler.Sampler`; its request-side records are
:class:`minivllm.sampling_params.SamplingParams` and, for stop strings, :mod:`minivllm.stop`.
"""

from minivllm.sampling.batch import PenaltyBatch, SamplingBatch, make_generator
from minivllm.sampling.filters import (
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    draw_uniforms,
    random_sample,
)

__all__ = [
    "PenaltyBatch",
    "SamplingBatch",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k",
    "apply_top_p",
    "draw_uniforms",
    "make_generator",
    "random_sample",
]
