"""Phases 03-05 on the GPU: RMSNorm, fused add+RMSNorm, QK-norm, RoPE and SiLU-and-mul, bf16,
on Qwen3-0.6B shapes, against the eager PyTorch reference and ``torch.compile`` of it (same run).

    python -m bench.run kernels        # writes bench/results/03_05_kernels.json

For each kernel and token count: GPU time per call (CUDA-graph replay, so launch cost is excluded),
GB/s (bytes the kernel must read and write / time) for numba, eager and compiled; and for decode
sizes (1-16 tokens) the launch-bound time per call issued from Python, numba vs eager.
"""

import importlib

import torch

from kernels._timing import bench_loop, graph_time

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, INTER = 1024, 16, 8, 128, 3072  # Qwen3-0.6B
TOKENS = [1, 16, 256, 4096, 16384]
DTYPE = torch.bfloat16
EPS = 1e-6


def _cases(tokens: int) -> dict:
    """name -> (numba fn, reference fn, bytes moved) for one token count; modules not yet written are skipped."""
    dev, t, b = "cuda", tokens, torch.tensor([], dtype=DTYPE).element_size()
    cases = {}
    try:
        rn = importlib.import_module("kernels.rmsnorm")
        x = torch.randn(t, HIDDEN, device=dev, dtype=DTYPE)
        res = torch.randn_like(x)
        w = torch.randn(HIDDEN, device=dev, dtype=DTYPE)
        q = torch.randn(t, Q_HEADS, HEAD_DIM, device=dev, dtype=DTYPE)
        wq = torch.randn(HEAD_DIM, device=dev, dtype=DTYPE)
        cases["rms_norm"] = (lambda: rn.rms_norm(x, w, EPS), lambda: rn.rms_norm_ref(x, w, EPS), 2 * x.numel() * b)
        cases["fused_add_rms_norm"] = (lambda: rn.fused_add_rms_norm(x, res, w, EPS),
                                       lambda: rn.fused_add_rms_norm_ref(x, res, w, EPS), 4 * x.numel() * b)
        cases["qk_norm"] = (lambda: rn.rms_norm(q, wq, EPS), lambda: rn.rms_norm_ref(q, wq, EPS), 2 * q.numel() * b)
    except ImportError as e:
        print(f"skipping RMSNorm: {e}")
    try:
        rp = importlib.import_module("kernels.rope")
        q = torch.randn(t, Q_HEADS, HEAD_DIM, device=dev, dtype=DTYPE)
        k = torch.randn(t, KV_HEADS, HEAD_DIM, device=dev, dtype=DTYPE)
        cache = rp.rope_cache(HEAD_DIM, 40960, 1e6, device=dev)
        pos = torch.randint(0, 40960, (t,), device=dev)
        moved = 2 * (q.numel() + k.numel()) * b + t * (8 + HEAD_DIM * cache.element_size())
        cases["rope"] = (lambda: rp.apply_rope(q, k, pos, cache), lambda: rp.apply_rope_ref(q, k, pos, cache), moved)
    except ImportError as e:
        print(f"skipping RoPE: {e}")
    try:
        act = importlib.import_module("kernels.activation")
        gu = torch.randn(t, 2 * INTER, device=dev, dtype=DTYPE)
        cases["silu_and_mul"] = (lambda: act.silu_and_mul(gu), lambda: act.silu_and_mul_ref(gu), 3 * t * INTER * b)
    except ImportError as e:
        print(f"skipping SwiGLU: {e}")
    return cases


def _check(name: str, got, want) -> None:
    """The benchmark times only correct kernels: bf16 results within 2% of the largest value."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        err = (g.float() - w.float()).abs().max().item()
        scale = w.float().abs().max().item() + 1e-6
        if err > 0.02 * scale:
            raise AssertionError(f"{name}: numba result differs from the reference (max |err| {err:.3g})")


def run() -> dict:
    from tqdm.auto import tqdm

    results = []
    for tokens in tqdm(TOKENS, desc="kernels"):
        for name, (fn, ref, moved) in _cases(tokens).items():
            want = ref()  # first: the in-place kernels (rope, fused add) change their inputs
            _check(name, fn(), want)
            compiled = torch.compile(ref, dynamic=False)
            reps = max(1, min(50, (1 << 28) // moved))
            row = {"kernel": name, "tokens": tokens, "dtype": str(DTYPE).removeprefix("torch."), "bytes": moved}
            for label, f in (("numba", fn), ("eager", ref), ("compile", compiled)):
                us = graph_time(f, reps=reps).median_us
                row[f"{label}_us"] = us
                row[f"{label}_gbps"] = moved / (us * 1e-6) / 1e9
            if tokens <= 16:  # decode sizes: what a Python loop of launches costs, vs the replayed graph
                row["numba_launch_us"] = bench_loop(fn, iters=100).median_us
                row["eager_launch_us"] = bench_loop(ref, iters=100).median_us
                row["graph_us"] = row["numba_us"]
            else:
                row["graph_us"] = None
            results.append(row)
            print(f"{name:20s} {tokens:6d} tok  numba {row['numba_us']:8.1f} us {row['numba_gbps']:6.0f} GB/s | "
                  f"eager {row['eager_us']:8.1f} us | compile {row['compile_us']:8.1f} us")
    return {"results": results}
