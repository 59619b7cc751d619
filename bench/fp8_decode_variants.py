"""The fp8 (e4m3) decode kernel's four builds against the bf16 pool, on ``bench.paged_decode``'s cases.

    python -m bench.fp8_decode_variants [--out DIR]     # GPU only; writes 17_fp8_decode_variants_cuda.json

Each case's pool is copied to e4m3 and timed by CUDA-graph replay with the two ways to widen a byte (masks and
shifts; the hardware's ``cvt.rn.f16x2.e4m3x2``, sm_89+) times the two arithmetics (fp32; fp16 pairs,
``fma.rn.f16x2``), beside the bf16 pool with the module's defaults. For cases of batch <= 64 each build's output is
compared with ``paged_attention_ref`` reading the same bytes (``*_err``); ``floor_fp8_us`` is the e4m3 bytes over
the measured copy bandwidth. The module's switches are ``kernels.paged_attention_warp.FP8_CVT`` and ``FP8_HALF2``.
"""

import torch

from bench._harness import kernel_bench_main

NAME = "17_fp8_decode_variants_cuda"
VARIANTS = {"fp8_shift": (False, False), "fp8_cvt": (True, False), "fp8_h2": (False, True), "fp8_cvth2": (True, True)}


def run() -> dict:
    import kernels.paged_attention_warp as w
    from bench import paged_decode as pd
    from kernels._timing import graph_time
    from kernels.paged_attention import paged_attention_ref

    cvt_ok = w._has_cvt(torch.cuda.current_device())
    rows = {}
    for c in pd.cases():
        q, cache, tables, lens = c["tensors"]
        f8 = cache.to(torch.float8_e4m3fn)
        limit = c["max_context_len"]
        row = {"bf16": round(graph_time(lambda: w.paged_attention_warp(q, cache, tables, lens, max_context_len=limit),
                                        reps=10, iters=5).median_us, 2)}
        ref = paged_attention_ref(q, f8, tables, lens).float() if c["batch"] <= 64 else None
        for label, (cvt, half2) in VARIANTS.items():
            if cvt and not cvt_ok:
                continue

            def call(max_len=limit, cvt=cvt, half2=half2):
                return w.paged_attention_warp(q, f8, tables, lens, max_context_len=max_len, fp8_cvt=cvt,
                                              fp8_half2=half2)

            row[label] = round(graph_time(call, reps=10, iters=5).median_us, 2)
            if ref is not None:
                row[label + "_err"] = (call(None).float() - ref).abs().max().item()
        row["floor_fp8_us"] = round(c["floor_us"] / 2, 2)
        rows[c["name"]] = row
        print(c["name"], row, flush=True)
    return {"gpu_rows": rows}


def main(argv: list[str] | None = None) -> int:
    return kernel_bench_main("bench.fp8_decode_variants", __doc__, NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
