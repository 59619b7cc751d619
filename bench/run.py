"""Run benchmarks by name and save each result to ``bench/results/<file>.json``.

    python -m bench.run basics            # phase 01: copy bandwidth, launch overhead
    python -m bench.run kernels           # phases 03-05: RMSNorm, RoPE, SwiGLU vs eager and torch.compile
    python -m bench.run attention         # phase 07: prefill attention, ours vs SDPA's flash backend
    python -m bench.run paged_attention   # phase 08: decode attention vs the HBM floor and gather + SDPA; store_kv
    python -m bench.run paged_decode      # the paged decode kernel's launch settings against the floor
    python -m bench.run decode_order      # decode attention's row order and grid order against the floor
    python -m bench.run prefill_sweep     # the tensor-core prefill kernel's launch settings against SDPA
    python -m bench.run gemv              # small-step matmuls (kernels.gemv, its prologue kernels) vs cuBLAS
    python -m bench.run norm_variants     # RMSNorm's bf16 builds vs torch.compile
    python -m bench.run kernel_floor      # one tiny kernel in a CUDA graph: numba vs ATen vs Triton
    python -m bench.run all
    python -m bench.run basics --out DIR  # e.g. $OUT on the device machine

Needs a GPU: on a CPU machine the kernels would run in the simulator and the figures would mean nothing.
"""

import argparse
import importlib
import sys
from pathlib import Path

import kernels  # noqa: F401  -- choose numba's backend before anything imports numba

from bench._harness import RESULTS, save

# name -> ("module" or "module:function" returning the data, results file)
BENCHMARKS = {"basics": ("bench.basics", "01_basics"), "kernels": ("bench.kernels", "03_05_kernels"),
              "attention": ("bench.attention:run_prefill", "07_attention"),
              "paged_attention": ("bench.attention:run_decode", "08_paged_attention"),
              "paged_decode": ("bench.paged_decode", "17_paged_decode_cuda"),
              "decode_order": ("bench.decode_order", "17_decode_order_cuda"),
              "prefill_sweep": ("bench.prefill_sweep", "17_flash_mma_sweep_cuda"),
              "gemv": ("bench.gemv", "17_gemv_cuda"),
              "norm_variants": ("bench.norm_variants", "17_norm_variants_cuda"),
              "kernel_floor": ("bench.kernel_floor", "17_kernel_floor_cuda")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run minivllm benchmarks on the GPU.")
    parser.add_argument("names", nargs="+", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench.run: no GPU here; run it on the GPU machine (results from the simulator mean nothing)")
        return 2
    names = list(BENCHMARKS) if "all" in args.names else args.names
    for name in names:
        target, file = BENCHMARKS[name]
        module, _, function = target.partition(":")
        print(f"== {name}")
        data = getattr(importlib.import_module(module), function or "run")()
        print(f"saved {save(file, data, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
