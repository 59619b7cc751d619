"""Phase 01's measurements, shared by ``bench/`` (saved to ``bench/results/``) and notebook 01 (live on a GPU).

* :func:`bandwidth_sweep` -- GB/s of a copy (bytes read + bytes written per second) across sizes:
  ``torch``'s ``copy_`` against our numba copy kernel with 4-byte and 16-byte accesses, timed so
  that the figure is the GPU's own, not the host's launch cost (see :func:`_device_ms`).
* :func:`launch_overhead` -- microseconds per call of tiny kernels issued back to back: a torch op,
  a numba launch given raw torch tensors, given pre-wrapped numba arrays, through ``kernels._launch``,
  and one kernel replayed from a captured CUDA graph.

Both need a GPU.
"""

import torch

from kernels import basics
from kernels._launch import device_array, launch
from kernels._timing import bench, bench_loop, capture_graph, graph_time

DEFAULT_SIZES = [1 << p for p in range(12, 31, 2)]  # bytes per tensor: 4 KiB ... 1 GiB


def bandwidth_sweep(sizes: list[int] = DEFAULT_SIZES, *, progress: bool = True) -> dict:
    """``{"bytes": sizes, "series": {name: [GB/s per size]}}`` for copies of ``sizes`` bytes."""
    from tqdm.auto import tqdm

    series = {"torch copy_": [], "numba copy, 4 B/thread": [], "numba copy, 16 B/thread": []}
    for size in tqdm(sizes, desc="bandwidth sweep", disable=not progress):
        src = torch.randn(size // 4, device="cuda")
        dst = torch.empty_like(src)
        moved = 2 * size  # read once, written once
        fns = {
            "torch copy_": lambda: dst.copy_(src),
            "numba copy, 4 B/thread": lambda: basics.copy(src, dst, vector_bytes=4),
            "numba copy, 16 B/thread": lambda: basics.copy(src, dst, vector_bytes=16),
        }
        for name, fn in fns.items():
            series[name].append(moved / (_device_ms(fn, size) * 1e-3) / 1e9)
        assert torch.equal(dst, src)
        del src, dst
    return {"bytes": list(sizes), "series": series}


def _device_ms(fn, size: int) -> float:
    """Milliseconds of GPU time per call of ``fn``, without the host's launch cost.

    Small copies finish before the host can launch the next one, so they are replayed from a CUDA
    graph. Large ones (>= 256 MiB: ~130 us, several launches long) run back to back between two
    events instead: inside a graph torch turns a big ``copy_`` into a copy-engine memcpy node.
    """
    if size < 1 << 28:
        return graph_time(fn, reps=min(100, (1 << 28) // size)).median_ms
    reps = 10
    return bench(lambda: [fn() for _ in range(reps)], warmup=1, iters=5).median_ms / reps


def launch_overhead() -> dict[str, float]:
    """Microseconds per call of a 1-element kernel, five ways (see the module docstring)."""
    from numba import cuda

    x, y = torch.ones(1, device="cuda"), torch.ones(1, device="cuda")
    out = torch.empty(1, device="cuda")
    kernel = basics.add_kernel
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    wx, wy, wout = (device_array(t) for t in (x, y, out))
    configured = kernel[1, 32, stream]
    result = {
        "torch op (torch.add, out=)": bench_loop(lambda: torch.add(x, y, out=out)).median_us,
        "numba, torch tensors as arguments": bench_loop(lambda: kernel[1, 32, stream](x, y, out)).median_us,
        "numba, pre-wrapped arrays": bench_loop(lambda: configured(wx, wy, wout)).median_us,
        "kernels._launch.launch (cached views)": bench_loop(
            lambda: launch(kernel, 1, 32, x, y, out, backend="gpu")).median_us,
    }
    per_graph = 100
    graph = capture_graph(lambda: [launch(kernel, 1, 32, x, y, out, backend="gpu") for _ in range(per_graph)])
    result["CUDA graph replay, per kernel"] = bench_loop(graph.replay, iters=20).median_us / per_graph
    torch.cuda.synchronize()
    assert out.item() == 2.0
    return result
