"""What one tiny kernel costs inside a CUDA graph: numba against a torch (ATen) and a Triton kernel, same run.

    python -m bench.kernel_floor [--out DIR]     # GPU only; writes 17_kernel_floor_cuda.json

At batch 1 a decode step replays ~230 kernels from a CUDA graph, most of which move a few KB: their time is the
cost of a kernel itself (the GPU starting it, a memory round trip or two, draining it), not of their work. Each
case here is one block of 32 threads, 50 launches captured in one graph and replayed (kernels._timing.graph_time):

* ``numba_empty_{1,3}``: no body, 1 or 3 (2-D) array arguments (numba passes each array as 9 scalars);
* ``numba_load``: one global load and one store; ``numba_chain2`` / ``numba_chain3``: 2 and 3 dependent loads
  (an index read, then the value it points at): the round trips a kernel cannot overlap;
* ``numba_div64``: the load kernel with a 64-bit integer division and remainder (numba's default int type);
* ``torch_add``: ATen's in-place add on 1 element; ``triton_add``: ``torch.compile`` of the same.
"""

import numba
import torch
from numba import cuda

from bench._harness import kernel_bench_main

NAME = "17_kernel_floor_cuda"


@cuda.jit
def empty1(a):
    pass


@cuda.jit
def empty3(a, b, c):
    pass


@cuda.jit
def load1(x, idx, out):
    i = cuda.threadIdx.x
    out[0, i] = x[0, i] + numba.float32(1.0)


@cuda.jit
def chain2(x, idx, out):
    i = cuda.threadIdx.x
    out[0, i] = x[0, idx[0, i]] + numba.float32(1.0)


@cuda.jit
def chain3(x, idx, out):
    i = cuda.threadIdx.x
    j = idx[0, i]
    out[0, i] = x[0, idx[0, j]] + numba.float32(1.0)


@cuda.jit
def div64(x, g, out):
    i = cuda.threadIdx.x
    out[0, i // g[0, 0] + i % g[0, 0]] = x[0, i] + numba.float32(1.0)


def run() -> dict:
    from kernels._launch import launch
    from kernels._timing import graph_time

    x = torch.zeros(1, 64, device="cuda")
    idx = torch.arange(64, device="cuda", dtype=torch.int64).view(1, 64)
    g = torch.full((1, 1), 32, device="cuda", dtype=torch.int64)
    out = torch.zeros(1, 64, device="cuda")
    one = torch.zeros(1, device="cuda")
    compiled = torch.compile(lambda: one.add_(1.0), dynamic=False)
    cases = {
        "numba_empty_1": lambda: launch(empty1, 1, 32, x, backend="gpu"),
        "numba_empty_3": lambda: launch(empty3, 1, 32, x, idx, out, backend="gpu"),
        "numba_load": lambda: launch(load1, 1, 32, x, idx, out, backend="gpu"),
        "numba_chain2": lambda: launch(chain2, 1, 32, x, idx, out, backend="gpu"),
        "numba_chain3": lambda: launch(chain3, 1, 32, x, idx, out, backend="gpu"),
        "numba_div64": lambda: launch(div64, 1, 32, x, g, out, backend="gpu"),
        "torch_add": lambda: one.add_(1.0),
        "triton_add": compiled,
    }
    rows = {}
    for name, fn in cases.items():
        fn()
        rows[name] = round(graph_time(fn, reps=50, iters=20).median_us, 3)
        print(f"{name:16s} {rows[name]:6.2f} us", flush=True)
    return {"per_kernel_us": rows}


def main(argv: list[str] | None = None) -> int:
    return kernel_bench_main("bench.kernel_floor", __doc__, NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
