"""minivllm: a small, fast LLM inference engine for the Qwen3 architecture, built phase by phase.

    >>> from minivllm import LLM, SamplingParams
    >>> LLM().generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text

The engine's modules arrive with the course's phases (see README.md): the tokenizer (02), the model
and its loaders (06), the paged KV cache (08), the radix prefix cache (09), the sampler (10), the
scheduler (11), the engine and ``LLM`` (12), the server (13), and the course helpers
(``minivllm.course``). The kernels live in the sibling package ``kernels``. ``LLM`` and
``SamplingParams`` are imported lazily, so ``import minivllm`` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from minivllm.llm import LLM

        return LLM
    if name == "LLMEngine":
        from minivllm.engine import LLMEngine

        return LLMEngine
    if name == "SamplingParams":
        from minivllm.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")
