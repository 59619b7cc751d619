"""kernels.gemv at Qwen3-0.6B's decode shapes: the plain kernel against cuBLAS, and the prologue kernels against
the two launches they replace.

    python -m bench.gemv [--out DIR]     # GPU only; writes 17_gemv_cuda.json

Every figure is a CUDA-graph replay median (``kernels._timing.graph_time``), so a launch costs what it costs in
the engine's decode graphs. Rows:

* ``plain``: ``gemv`` and ``F.linear`` (cuBLAS) on the layer's four matmuls, 1 to 8 tokens, beside the HBM floor
  (the weight's bytes over 4.3 TB/s);
* ``silu``: ``gemv_silu`` (SiLU·mul folded in) against ``silu_and_mul`` + ``gemv`` and ``silu_and_mul`` + cuBLAS,
  ``down_proj``'s shape;
* ``add_norm``: ``gemv_add_norm`` against ``fused_add_rms_norm`` + ``gemv`` and + cuBLAS, ``qkv_proj``'s and
  ``gate_up_proj``'s shapes; at one token also its per-warp version at 1, 2 and 4 rows a warp (``warp_r*``), each
  alone and per call in a chain of ``CHAIN`` calls in one graph (``*_chain_us``: with PDL each launch overlaps the
  one before, as in a decode step), beside the two kernels' chain.

Each fused result is compared with its reference (``*_err``, the largest difference in bf16 units of the output).
"""

import functools

import torch
import torch.nn.functional as F

from bench._harness import kernel_bench_main

NAME = "17_gemv_cuda"
HBM_GBPS = 4300.0
PLAIN = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o, gate_up, down: (N, K)
TOKENS = (1, 2, 4, 8)
CHAIN = 8


def _us(fn) -> float:
    from kernels._timing import graph_time

    return round(graph_time(fn).median_us, 2)


def _chain_us(fn) -> float:
    """Per call, ``CHAIN`` calls captured in one graph: each launch waits on the one before, as in a decode step."""
    from kernels._timing import graph_time

    def chain():
        for _ in range(CHAIN):
            fn()

    return round(graph_time(chain).median_us / CHAIN, 2)


def run() -> dict:
    from kernels import gemv as g
    from kernels.activation import silu_and_mul
    from kernels.rmsnorm import fused_add_rms_norm

    torch.manual_seed(0)
    dev = "cuda"
    plain, silu, add_norm = [], [], []
    for n, k in PLAIN:
        weight = (torch.randn(n, k, device=dev) * 0.05).to(torch.bfloat16)
        for t in TOKENS:
            x = torch.randn(t, k, device=dev).to(torch.bfloat16)
            row = {"n": n, "k": k, "tokens": t, "floor_us": round(weight.nbytes / HBM_GBPS / 1e3, 2),
                   "gemv_us": _us(lambda: g.gemv(x, weight)), "cublas_us": _us(lambda: F.linear(x, weight))}
            plain.append(row)
            print("plain", row, flush=True)
    n, k = 1024, 3072  # down_proj
    weight = (torch.randn(n, k, device=dev) * 0.05).to(torch.bfloat16)
    for t in TOKENS:
        gate_up = torch.randn(t, 2 * k, device=dev).to(torch.bfloat16)
        if not g.prologue_supported(gate_up[:, :k].contiguous(), weight):
            continue
        err = (g.gemv_silu(gate_up, weight).float() - g.gemv_silu_ref(gate_up, weight).float()).abs().max().item()
        row = {"n": n, "k": k, "tokens": t, "err": err,
               "fused_us": _us(lambda: g.gemv_silu(gate_up, weight)),
               "two_kernels_us": _us(lambda: g.gemv(silu_and_mul(gate_up), weight)),
               "with_cublas_us": _us(lambda: F.linear(silu_and_mul(gate_up), weight))}
        silu.append(row)
        print("silu", row, flush=True)
    for n, k in ((4096, 1024), (6144, 1024)):  # qkv_proj, gate_up_proj
        weight = (torch.randn(n, k, device=dev) * 0.05).to(torch.bfloat16)
        norm_weight = (1 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16)
        for t in TOKENS:
            x, res = (torch.randn(t, k, device=dev).to(torch.bfloat16) for _ in range(2))
            got, got_res = g.gemv_add_norm(x, res, norm_weight, 1e-6, weight)
            want, want_res = g.gemv_add_norm_ref(x, res, norm_weight, 1e-6, weight)
            x2, res2 = x.clone(), res.clone()  # the separate kernels work in place: their own copies

            def two(lin):
                h, r = fused_add_rms_norm(x2, res2, norm_weight, 1e-6)
                return lin(h, weight)

            row = {"n": n, "k": k, "tokens": t, "err": (got.float() - want.float()).abs().max().item(),
                   "residual_equal": bool(torch.equal(got_res, want_res)),
                   "fused_us": _us(lambda: g.gemv_add_norm(x, res, norm_weight, 1e-6, weight)),
                   "two_kernels_us": _us(lambda: two(g.gemv)), "with_cublas_us": _us(lambda: two(F.linear))}
            if t == 1:  # the per-warp kernel, alone and in a chain of CHAIN launches (one graph: PDL between them)
                row["two_kernels_chain_us"] = _chain_us(lambda: two(g.gemv))
                for r in (1, 2, 4):
                    got, got_res = g.gemv_add_norm(x, res, norm_weight, 1e-6, weight, rows_per_warp=r)
                    row[f"warp_r{r}_err"] = (got.float() - want.float()).abs().max().item()
                    row[f"warp_r{r}_residual_equal"] = bool(torch.equal(got_res, want_res))
                    fn = functools.partial(g.gemv_add_norm, x, res, norm_weight, 1e-6, weight, rows_per_warp=r)
                    row[f"warp_r{r}_us"], row[f"warp_r{r}_chain_us"] = _us(fn), _chain_us(fn)
            add_norm.append(row)
            print("add_norm", row, flush=True)
    return {"hbm_gbps_for_floor": HBM_GBPS, "plain": plain, "silu": silu, "add_norm": add_norm}


def main(argv: list[str] | None = None) -> int:
    return kernel_bench_main("bench.gemv", __doc__, NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
