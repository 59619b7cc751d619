"""The tensor-core prefill kernel's launch settings on the GPU, each against SDPA's flash backend in the same run.

    python -m bench.prefill_sweep [--out DIR]        # GPU only; writes 17_flash_mma_sweep_cuda.json

``kernels.flash_attention_mma``'s pipelined layout built four ways: 4 or 8 warps per block (64 or 128 query rows
sharing each K/V tile that the block copies into shared memory), and the query tiles taken in order or heaviest
first (under a causal mask the last tiles see the most keys; started last, they finish alone at the end of the
grid). One causal sequence of 1k-16k tokens, Qwen3-0.6B's heads (16 query / 8 KV heads x 128), bf16. Each
variant is first checked against ``flash_attention_ref``, then timed by CUDA-graph replay; SDPA runs restricted
to its flash backend (FlashAttention-2), the peer of ``bench.attention``.
"""

from collections.abc import Callable

import torch

from bench._harness import kernel_bench_main

NAME = "17_flash_mma_sweep_cuda"
HEADS, KV_HEADS, DIM = 16, 8, 128
TOKENS = (1024, 4096, 8192, 16384)
VARIANTS = ((4, False), (4, True), (8, False), (8, True))  # (warps, heavy_first)


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """SDPA on (heads, n, d) copies of the packed tensors, flash backend only on a GPU."""
    qt, kt, vt = (x.transpose(0, 1)[None].contiguous() for x in (q, k, v))

    def call() -> torch.Tensor:
        if not q.is_cuda:
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    return call


def run(tokens: tuple[int, ...] = TOKENS, variants: tuple[tuple[int, bool], ...] = VARIANTS, *,
        device: str = "cuda", timer: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """Every variant at every length (printed as it goes); the data of ``17_flash_mma_sweep_cuda.json``.
    ``timer``: µs per call (default: CUDA-graph replay); a test passes the simulator's shapes and a stand-in."""
    from kernels import flash_attention_mma as fm
    from kernels._mma import mma_bf16, pack_bf16
    from kernels.flash_attention import flash_attention_ref

    if timer is None:
        from kernels._timing import graph_time

        def timer(fn):
            return graph_time(fn).median_us
    built = {(w, h): fm._build_pipelined(mma_bf16, pack_bf16, DIM, f"sweep_w{w}_{'heavy' if h else 'ordered'}", w, h)
             for w, h in variants}
    rows = []
    for n in tokens:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(n, heads, DIM, device=device, dtype=torch.bfloat16, generator=g)
                   for heads in (HEADS, KV_HEADS, KV_HEADS))
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        want = flash_attention_ref(q, k, v, cu, cu).float()
        row = {"tokens": n, "sdpa_flash_us": round(timer(_sdpa_flash(q, k, v)), 2), "variants": {}}
        for (warps, heavy), kernel in built.items():
            key, saved_warps = (torch.bfloat16, DIM, True, warps), fm.WARPS
            saved_kernel = fm.KERNELS.get(key)
            fm.KERNELS[key], fm.WARPS = kernel, warps  # what flash_attention_mma launches, restored below
            try:
                out = torch.empty_like(q)
                call = lambda: fm.flash_attention_mma(q, k, v, cu, cu, max_seqlen_q=n, out=out,  # noqa: E731
                                                      pipelined=True)
                call()
                err = (out.float() - want).abs().max().item()
                us = timer(call)
            finally:
                fm.WARPS = saved_warps
                if saved_kernel is None:
                    del fm.KERNELS[key]
                else:
                    fm.KERNELS[key] = saved_kernel
            name = f"w{warps}_{'heavy_first' if heavy else 'in_order'}"
            row["variants"][name] = {"warps": warps, "heavy_first": heavy, "us": round(us, 2), "max_abs_err": err,
                                     "vs_sdpa": round(row["sdpa_flash_us"] / us, 3)}
            print(f"{n:6d} tokens {name:15s} {us:9.1f} us  SDPA flash {row['sdpa_flash_us']:8.1f} us  "
                  f"{row['sdpa_flash_us'] / us:.3f}x  max |err| {err:.1e}", flush=True)
        rows.append(row)
    names = list(rows[0]["variants"])
    correct = [m for m in names if all(r["variants"][m]["max_abs_err"] < 5e-2 for r in rows)]
    best = min(correct, key=lambda m: sum(r["variants"][m]["us"] for r in rows)) if correct else None
    return {"shapes": {"q_heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "bfloat16", "causal": True},
            "rows": rows, "best": best, "default_warps": fm.WARPS,
            "best_vs_sdpa": None if best is None else {r["tokens"]: r["variants"][best]["vs_sdpa"] for r in rows}}


def main(argv: list[str] | None = None) -> int:
    return kernel_bench_main("bench.prefill_sweep", __doc__, NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
