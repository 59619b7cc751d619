"""Timing kernels: CUDA events on the GPU, ``perf_counter`` on the CPU, and CUDA-graph replay.

Two questions, two functions:

* :func:`bench` -- how long one call takes on the device (median of per-call CUDA events, each call
  synchronised); use it for bandwidth.
* :func:`bench_loop` -- how long a call takes when issued back to back (events around a loop); when
  the kernels are tiny, this is the *launch overhead* the host pays per call.
* :func:`graph_time` -- the GPU's own time per call, with the launches replayed from a CUDA graph.

:func:`capture_graph` records a callable into a ``torch.cuda.CUDAGraph``; replaying it launches all
the recorded kernels with one host call.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    n: int

    @property
    def median_us(self) -> float:
        return self.median_ms * 1e3


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def bench(fn: Callable[[], object], *, warmup: int = 3, iters: int = 20) -> Timing:
    """Median and minimum time of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    samples = []
    if _on_gpu():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), min(samples), iters)


def bench_loop(fn: Callable[[], object], *, warmup: int = 10, iters: int = 200, repeats: int = 5) -> Timing:
    """Time per call of ``fn`` issued ``iters`` times back to back (median over ``repeats`` loops)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if _on_gpu():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
        samples.append((time.perf_counter() - t0) * 1e3 / iters)
    return Timing(statistics.median(samples), min(samples), repeats * iters)


def graph_time(fn: Callable[[], object], *, reps: int = 20, iters: int = 10) -> Timing:
    """GPU time per call of ``fn`` alone: ``reps`` calls captured in one CUDA graph, replayed.

    Replaying removes the host's launch cost, so short kernels show their own duration.
    """
    graph = capture_graph(lambda: [fn() for _ in range(reps)])
    t = bench(graph.replay, warmup=2, iters=iters)
    return Timing(t.median_ms / reps, t.min_ms / reps, t.n * reps)


def capture_graph(fn: Callable[[], object], *, warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """Record ``fn`` (kernels on torch's current stream, static buffers) into a CUDA graph.

    ``fn`` runs ``warmup`` times on a side stream first, so numba compiles and caches before capture.
    """
    if not _on_gpu():
        raise RuntimeError("CUDA graphs need a GPU")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph
