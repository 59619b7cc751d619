"""Small arithmetic every part of the engine shares (one copy of each rule).

``kernels`` keeps its own ``cdiv`` (``kernels._launch``): the kernel modules import nothing of ``minivllm``.
"""


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ``a`` and positive ``b``: how many ``b``-sized pieces hold ``a``."""
    return -(-a // b)
