"""RMSNorm's bf16 16-byte kernels built several ways, against ``torch.compile`` of the reference, in one run.

    python -m bench.norm_variants [--out DIR]     # GPU only; writes 17_norm_variants_cuda.json
    python -m bench.norm_variants --defaults-only # the default path and torch.compile only (bench.targets)

The module's defaults (``default``: for hidden-size rows the block-per-row kernels, ``rmsnorm.ROW_PER_BLOCK``; for
QK-norm's 128-wide heads the head kernels, ``rmsnorm.HEAD_LAYOUTS`` (until session 23: the block-per-row kernel up to
``rmsnorm.NARROW_ROW_MAX_ROWS`` heads, else the warp kernels);
hidden-size rows a block of 4 warps, one chunk a thread (``row_w4``), or, for RMSNorm of ``rmsnorm.ROW_WARP_ROWS`` rows
when that is set, a block of one warp, 4 chunks a thread, launched without PDL and compiled without its instructions
(``row_w1c4_nopdl``; ``row_w1c4`` with PDL): all three are timed at every size;
on sm_90+ launched with programmatic dependent launch, kernels._pdl, and
``default_no_pdl`` the same without it) against the warp kernels (``warp``), QK-norm on the block-per-row kernel
(``row``: a 32-thread block per head, 16 of its threads holding the head's 16 chunks) and on the head kernels
(``heads_*``, ``HEAD_BUILDS`` below: several heads a block, a head's threads reducing by shuffles alone; the default
for QK-norm since session 23, ``rmsnorm.HEAD_LAYOUTS``), and the builds
(kernels._rmsnorm_vec.bf16_variant, ``BUILDS`` below): the rounding to
bf16 by integer arithmetic or by the GPU's ``cvt.rn.bf16x2.f32``; the weight loaded after the row's reduction or
with the row; 2, 4, 8 or 16 chunks of 16 bytes per thread; a thread's row and lane by int64 ``//`` and ``%`` or by a
shift and a mask; 32, 64, 128 or 256 threads per block; and, for RMSNorm alone, the streaming kernel (a grid of 1 or 2
waves of resident blocks, the next row loaded while one is normalized). Each is timed by CUDA-graph replay on
Qwen3-0.6B's shapes (hidden 1,024; QK-norm over 16 heads of 128) and its output compared with ``rms_norm_ref`` /
``fused_add_rms_norm_ref`` (``*_err``, the largest difference in units of the result's largest value). GB/s: bytes
the kernel must move over its time.
"""

import torch

from bench._harness import kernel_bench_main

NAME = "17_norm_variants_cuda"
TOKENS = (1, 16, 256, 1024, 4096, 8192, 16384)
BUILDS = {  # label -> (cvt, weight_early, chunks per thread, divide, threads per block)
    "warp": (True, True, 4, False, 64),  # a warp (or less) per row: the default until the block-per-row kernels
    "before": (False, False, 4, True, 64),  # the kernels until 2026-12-05: integer rounding, weight late, int64 //
    "divide": (True, True, 4, True, 64),  # today's defaults but for the int64 // and %
    "late": (True, False, 4, False, 64),  # ... but for the weight loaded after the reduction
    "c2": (True, True, 2, False, 64),
    "block32": (True, True, 4, False, 32),  # a block of one warp: at 1,024-wide rows a row a block, the layout
    #   Inductor's heuristic gives torch.compile's persistent reduction there (one row, num_warps=1, no shared memory)
    "block128": (True, True, 4, False, 128),
    "block256": (True, True, 4, False, 256),
    "c8": (True, True, 8, False, 64),  # more chunks a thread: QK-norm's 16-chunk heads on 2 threads, or 1 (c16;
    "c16": (True, False, 16, False, 64),  # its weight loaded late: 64 words of row are already held)
    "c16_block32": (True, False, 16, False, 32),
}
HEAD_BUILDS = {  # QK-norm's head kernels (kernels._rmsnorm_vec.make_head_kernel): (threads a head, heads a thread,
    "heads_t16": (16, 1, 256),  # threads a block); rmsnorm.HEAD_LAYOUTS picks one of them by the number of heads
    "heads_t16_b128": (16, 1, 128),
    "heads_t8": (8, 1, 128),
    "heads_t4r4": (4, 4, 64),
    "heads_t4r2": (4, 2, 64),
}
STREAM_WAVES = (1, 2)  # the streaming RMSNorm kernel (rms_norm only) on a grid of 1 or 2 waves of resident blocks
HIDDEN, HEADS, HEAD_DIM, EPS = 1024, 16, 128, 1e-6


def _err(got, want) -> float:
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    return max(((g.float() - w.float()).abs().max() / (w.float().abs().max() + 1e-6)).item() for g, w in zip(got, want))


def run(defaults_only: bool = False) -> dict:
    """``defaults_only``: the module's default path (with and without PDL) and ``torch.compile`` only, no builds."""
    from kernels import _launch as kl
    from kernels import _rmsnorm_vec as vec
    from kernels import rmsnorm as rn
    from kernels._timing import graph_time

    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        res = torch.randn_like(x)
        w = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        wq = torch.randn(HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        cases = {  # name -> (tensors, reference, bytes, fused)
            "rms_norm": ((x, w), lambda: rn.rms_norm_ref(x, w, EPS), 2 * x.nbytes, False),
            "fused_add_rms_norm": ((x, res, w), lambda: rn.fused_add_rms_norm_ref(x, res, w, EPS), 4 * x.nbytes, True),
            "qk_norm": ((q, wq), lambda: rn.rms_norm_ref(q, wq, EPS), 2 * q.nbytes, False),
        }
        for name, (tensors, ref, moved, fused) in cases.items():
            reps = max(1, min(50, (1 << 28) // moved))
            row = {"kernel": name, "tokens": tokens, "bytes": moved}

            def default(tensors=tensors, fused=fused):
                if fused:
                    return rn.fused_add_rms_norm(tensors[0].clone(), tensors[1].clone(), tensors[2], EPS)
                return rn.rms_norm(tensors[0], tensors[1], EPS)

            want = ref()
            row["default_err"] = _err(default(), want)
            timed = {"default": lambda tensors=tensors, fused=fused: (
                rn.fused_add_rms_norm(*tensors, EPS) if fused else rn.rms_norm(*tensors, EPS))}

            def no_pdl(tensors=tensors, fused=fused):  # the default kernels launched (and captured) without PDL
                kl.PDL, before = False, kl.PDL
                try:
                    return rn.fused_add_rms_norm(*tensors, EPS) if fused else rn.rms_norm(*tensors, EPS)
                finally:
                    kl.PDL = before

            timed["default_no_pdl"] = no_pdl
            for label, (cvt, early, chunks, divide, block) in ({} if defaults_only else BUILDS).items():
                kernel = vec.bf16_variant(cvt, early, chunks, divide)[1 if fused else 0]

                def call(tensors=tensors, kernel=kernel, chunks=chunks, fused=fused, block=block, copy=False):
                    rn.SMALL_GROUP_BLOCK, default_block = block, rn.SMALL_GROUP_BLOCK
                    try:
                        if fused:
                            a, b = (tensors[0].clone(), tensors[1].clone()) if copy else tensors[:2]
                            rn._run(kernel, a, b, tensors[2], EPS, True, "gpu", chunks)
                            return a, b
                        out = torch.empty_like(tensors[0])
                        rn._run(kernel, tensors[0], out, tensors[1], EPS, True, "gpu", chunks)
                        return out
                    finally:
                        rn.SMALL_GROUP_BLOCK = default_block

                row[f"{label}_err"] = _err(call(copy=True), want)
                timed[label] = call
            if name == "qk_norm" and not defaults_only:  # a block per head (the hidden-size rows' kernel; half its
                #                                            warp idles on 16 chunks)
                def per_head(tensors=tensors):
                    return rn.rms_norm(tensors[0], tensors[1], EPS, row=True)

                row["row_err"] = _err(per_head(), want)
                timed["row"] = per_head
                for label, layout in HEAD_BUILDS.items():  # the head kernels, each layout at every size
                    kernel = vec.head_kernel(*layout)

                    def heads(tensors=tensors, kernel=kernel):
                        out = torch.empty_like(tensors[0])
                        rn._run(kernel, tensors[0], out, tensors[1], EPS, True, "gpu", row=True)
                        return out

                    row[f"{label}_err"] = _err(heads(), want)
                    timed[label] = heads
            if name != "qk_norm" and not defaults_only:  # hidden-size rows: a block per row of 4 warps (a chunk a
                #                                            thread), or of one warp
                for label, warps, per_thread, pdl in (("row_w4", 4, 1, True), ("row_w1c4", 1, 4, True),
                                                      ("row_w1c4_nopdl", 1, 4, False)):  # (4 chunks a thread)
                    kernel = vec.row_kernels(torch.bfloat16, warps, per_thread, pdl)[1 if fused else 0]

                    def per_row(tensors=tensors, kernel=kernel, fused=fused, copy=False):
                        if fused:
                            a, b = (tensors[0].clone(), tensors[1].clone()) if copy else tensors[:2]
                            rn._run(kernel, a, b, tensors[2], EPS, True, "gpu", row=True)
                            return a, b
                        out = torch.empty_like(tensors[0])
                        rn._run(kernel, tensors[0], out, tensors[1], EPS, True, "gpu", row=True)
                        return out

                    row[f"{label}_err"] = _err(per_row(copy=True), want)
                    timed[label] = per_row
            if not fused and not defaults_only:
                kernel = vec.bf16_variant(True, True, 4, False, True)[0]
                for waves in STREAM_WAVES:
                    def streamed(tensors=tensors, kernel=kernel, waves=waves):
                        from kernels._launch import resident_blocks
                        out = torch.empty_like(tensors[0])
                        cap = waves * resident_blocks(kernel, rn.SMALL_GROUP_BLOCK, out.device)
                        rn._run(kernel, tensors[0], out, tensors[1], EPS, True, "gpu", max_blocks=cap)
                        return out

                    streamed()  # compiles: the occupancy query needs the compiled kernel
                    row[f"stream{waves}_err"] = _err(streamed(), want)
                    timed[f"stream{waves}"] = streamed
            timed["compile"] = torch.compile(ref, dynamic=False)
            for label, fn in timed.items():
                us = graph_time(fn, reps=reps).median_us
                row[f"{label}_us"] = round(us, 3)
                row[f"{label}_gbps"] = round(moved / us / 1e3, 1)
            rows.append(row)
            print(name, tokens, {k: v for k, v in row.items() if k.endswith("_us")}, flush=True)
    return {"results": rows}


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults_only = "--defaults-only" in argv
    argv = [a for a in argv if a != "--defaults-only"]
    return kernel_bench_main("bench.norm_variants", __doc__, NAME, lambda: run(defaults_only), argv)


if __name__ == "__main__":
    raise SystemExit(main())
