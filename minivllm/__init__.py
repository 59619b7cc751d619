"""minivllm: a small, fast LLM inference engine for the Qwen3 architecture, built phase by phase.

The engine's modules arrive with the course's phases (see README.md). Today the package holds the
course helpers (``minivllm.course``); the kernels live in the sibling package ``kernels``.
"""

__version__ = "0.1.0"
