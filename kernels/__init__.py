"""minivllm's numba.cuda kernels, each beside its PyTorch reference.

Every kernel module follows one pattern (see ../shared/STYLE.md §5): a docstring on the algorithm and
its limits, a PyTorch reference, the ``@cuda.jit`` kernel(s), and one launcher that checks its
arguments and dispatches to the GPU, the CUDA simulator or the reference (``kernels._launch``).

This package is *minivllm's* ``kernels``; it is unrelated to the PyPI project of the same name that
``transformers`` can use for hub kernels. ``MINIVLLM_KERNELS`` below lets code (and a test) tell them apart.
"""

MINIVLLM_KERNELS = True

from kernels._env import configure_numba  # noqa: E402

configure_numba()
