"""minivllm: a small, fast LLM inference engine for the Qwen3 architecture, built phase by phase.

The engine's modules arrive with the course's phases (see README.md): the tokenizer (02), the model
and its loaders (06), a first generator and the ``minivllm generate`` command, the block allocator and
radix prefix cache (08-09), and the course helpers (``minivllm.course``). The kernels live in the
sibling package ``kernels``.
"""

__version__ = "0.1.0"
