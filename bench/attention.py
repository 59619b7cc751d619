"""Phases 07-08 on the GPU: attention kernels, bf16, Qwen3-0.6B heads (16 query heads, 8 KV heads of 128).

    python -m bench.run attention          # prefill  -> bench/results/07_attention.json
    python -m bench.run paged_attention    # decode   -> bench/results/08_paged_attention.json
    python -m bench.attention --smoke --out DIR   # tiny shapes on a CPU (simulator): checks the script runs

**Prefill** (one causal sequence of 512 .. 16k tokens): ``kernels.flash_attention`` (scalar FMAs) and, at a
few sizes, ``flash_attention_paged``, against ``scaled_dot_product_attention`` restricted to its flash
backend, in the same run: ms per call, TFLOP/s (4 * heads * head_dim * n(n+1)/2 useful flops) and the
ratio. Our kernel is skipped (``null``) where its time, extrapolated as n^2 from the last size, would pass
``max_call_s``; it is timed with CUDA events per call (its launcher reads ``cu_seqlens`` on the host, so no
CUDA graph; the host part is tens of µs against its ms), SDPA by CUDA-graph replay. On an sm_80+ GPU also
``kernels.flash_attention_mma`` (tensor cores; given the longest query, so CUDA-graph replay), with its speed
as a fraction of SDPA's (``mma_vs_sdpa``), in both its layouts (``mma_*``: ``pipelined=False``, the first;
``mma_async_*``: the default). **Decode** (batch x context, every context the same length, blocks in shuffled order):
``kernels.paged_attention`` (and ``kernels.paged_attention_warp`` when that module exists), CUDA-graph
replay with ``max_context_len``, against the bandwidth floor (K and V bytes / this GPU's copy bandwidth,
``bench._harness.hbm_gbps``), against gather + SDPA (the blocks copied into dense tensors, then SDPA) and SDPA
alone on pre-gathered K/V; and
``kernels.store_kv``'s bandwidth. Every timed kernel's output is compared with SDPA's (``*_rel_err``:
max |diff| / max |SDPA|), so a fast wrong kernel shows.

Leaves out: batches of mixed lengths, fp16/fp32, other head shapes, and SDPA's other backends.
"""

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import kernels  # noqa: F401  -- choose numba's backend before anything imports numba

import torch
import torch.nn.functional as F

from bench._harness import RESULTS, hbm_gbps, save
from kernels._launch import cdiv
from kernels._timing import bench, graph_time

BF16_TENSOR_TFLOPS = 989.0  # H200 spec sheet, dense bf16 on tensor cores
FP32_FMA_TFLOPS = 67.0  # H200 spec sheet, fp32 on the CUDA cores (what scalar FMAs can reach)
FLOOR_TARGET = 0.6  # decode goal (reported, not asserted): this fraction of the floor at batch >= 32, ctx >= 2k


@dataclass(slots=True, frozen=True)
class Shapes:
    """What one run measures; ``SMOKE`` is small enough for the CUDA simulator on a CPU."""

    q_heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"
    prefill_tokens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    paged_prefill_tokens: tuple[int, ...] = (512, 2048, 8192)
    decode_batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    decode_contexts: tuple[int, ...] = (128, 512, 2048, 8192, 32768)
    store_tokens: tuple[int, ...] = (16, 256, 4096, 65536)
    max_kv_bytes: int = 40 * 2**30  # decode cases whose KV cache would be larger are skipped
    max_call_s: float = 2.0  # prefill: skip our kernel where one call would take longer
    seconds_per_timing: float = 0.3  # how much GPU time one measurement may use (sets reps/iters)


SMOKE = Shapes(q_heads=4, kv_heads=2, head_dim=16, block_size=4, dtype="float32", prefill_tokens=(8, 16),
               paged_prefill_tokens=(8,), decode_batches=(1, 2), decode_contexts=(12,), store_tokens=(4, 16),
               max_call_s=3600.0)  # the smoke run times every size: a slow, loaded CPU must not skip one


def _time_us(fn: Callable[[], object], shapes: Shapes, *, graph: bool) -> float:
    """Median µs per call. GPU: one call measured first, then enough repetitions to fill
    ``seconds_per_timing``, replayed from a CUDA graph (``graph``) or timed with per-call events."""
    if not torch.cuda.is_available():
        return bench(fn, warmup=0, iters=1).median_us  # smoke run: only proves the call works
    first_s = bench(fn, warmup=1, iters=1).median_ms / 1e3  # the warm-up compiles
    if graph:
        reps = max(1, min(50, int(shapes.seconds_per_timing / 8 / max(first_s, 1e-7))))
        return graph_time(fn, reps=reps, iters=5).median_us
    iters = max(2, min(20, int(shapes.seconds_per_timing / max(first_s, 1e-7))))
    return bench(fn, warmup=0, iters=iters).median_us


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() / (want.float().abs().max().item() + 1e-12)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, how: str) -> torch.Tensor:
    """SDPA on (batch, heads, len, d) tensors with GQA, run ``how`` (see :func:`_sdpa_how`)."""
    backend, _, repeated = how.partition(", ")
    if repeated and k.shape[1] != q.shape[1]:  # a torch whose SDPA cannot do GQA itself
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
    gqa = {} if repeated else {"enable_gqa": True}
    if backend == "default":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)


def _sdpa_how(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    """How :func:`_attend` runs here: ``default`` on a CPU; on a GPU the first of ``flash`` (its flash backend
    only), ``flash, K/V repeated`` (KV heads repeated first) and ``default, K/V repeated`` that works."""
    if q.device.type != "cuda":
        return "default"
    for how in ("flash", "flash, K/V repeated"):
        try:
            _attend(q, k, v, causal, how)
            return how
        except (RuntimeError, TypeError) as e:  # no kernel for these inputs / no enable_gqa in this torch
            print(f"SDPA {how} refused: {str(e).splitlines()[0][:200]}")
    return "default, K/V repeated"


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V with their heads already repeated where ``how`` needs it (so a timing leaves the copy out)."""
    if not how.endswith("K/V repeated"):
        return k, v
    return tuple(x.repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))


def _random(*shape: int, shapes: Shapes, device: str) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=getattr(torch, shapes.dtype))


# ----------------------------------------------------------------------------- prefill
def _time_ours(row: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, want: torch.Tensor, s: Shapes,
               device: str) -> tuple[int, float]:
    """Fill ``row`` with our dense (and, at the paged sizes, paged) kernel's ms and error; return (tokens, ms)."""
    from kernels.flash_attention import flash_attention, flash_attention_paged

    n = q.shape[0]
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    row["numba_ms"] = _time_us(lambda: flash_attention(q, k, v, cu, cu, out=out), s, graph=False) / 1e3
    row["numba_rel_err"] = _rel_err(out, want)
    if n in s.paged_prefill_tokens and n % s.block_size == 0:
        blocks = n // s.block_size
        pool = torch.empty(blocks, 2, s.block_size, s.kv_heads, s.head_dim, device=device, dtype=q.dtype)
        table = torch.randperm(blocks, device=device).to(torch.int32)  # shuffled, as an allocator leaves them
        pool[table.long(), 0] = k.view(blocks, s.block_size, s.kv_heads, s.head_dim)
        pool[table.long(), 1] = v.view(blocks, s.block_size, s.kv_heads, s.head_dim)
        lens = torch.tensor([n], dtype=torch.int32, device=device)
        paged = lambda: flash_attention_paged(q, pool, cu, table[None], lens, out=out)  # noqa: E731
        row["numba_paged_ms"] = _time_us(paged, s, graph=False) / 1e3
        row["numba_paged_rel_err"] = _rel_err(out, want)
    return n, row["numba_ms"]


def run_prefill(shapes: Shapes | None = None) -> dict:
    """Prefill rows: ours (dense and paged) vs SDPA flash, one causal sequence per size."""
    s = shapes or Shapes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, last = [], None  # last: (tokens, ms) of our kernel's latest measurement
    for n in s.prefill_tokens:
        q = _random(n, s.q_heads, s.head_dim, shapes=s, device=device)
        k, v = (_random(n, s.kv_heads, s.head_dim, shapes=s, device=device) for _ in range(2))
        q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))  # (1, heads, n, d)
        how = _sdpa_how(q4, k4, v4, causal=True)
        k4, v4 = _repeat_kv(q4, k4, v4, how)
        sdpa = lambda: _attend(q4, k4, v4, True, how)  # noqa: E731
        want = sdpa()[0].transpose(0, 1)  # (n, q_heads, d)
        flops = 4 * s.q_heads * s.head_dim * n * (n + 1) // 2
        row = {"tokens": n, "flops": flops, "sdpa_backend": how, "sdpa_ms": _time_us(sdpa, s, graph=True) / 1e3}
        predicted_s = None if last is None else last[1] * (n / last[0]) ** 2 / 1e3
        row["numba_ms"] = row["numba_rel_err"] = row["numba_paged_ms"] = row["numba_paged_rel_err"] = None
        row["numba_error"] = None
        if predicted_s is None or predicted_s <= s.max_call_s:
            try:
                last = _time_ours(row, q, k, v, want, s, device)
            except Exception as e:  # noqa: BLE001 -- keep SDPA's figures and the other sizes
                row["numba_error"] = repr(e)[:500]
                print(f"prefill {n}: our kernel FAILED {row['numba_error']}", flush=True)
        row["mma_ms"] = row["mma_rel_err"] = row["mma_error"] = row["mma_async_ms"] = row["mma_async_rel_err"] = None
        if device == "cuda":  # the tensor-core kernel (sm_80+, bf16/fp16)
            try:
                from kernels.flash_attention_mma import flash_attention_mma, supported

                if supported(q):
                    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
                    out = torch.empty_like(q)
                    mma = lambda: flash_attention_mma(q, k, v, cu, cu, max_seqlen_q=n, out=out,  # noqa: E731
                                                      pipelined=False)
                    row["mma_ms"] = _time_us(mma, s, graph=True) / 1e3
                    row["mma_rel_err"] = _rel_err(out, want)
                    out.zero_()  # the pipelined layout (cp.async + ldmatrix), in the same run
                    mma_async = lambda: flash_attention_mma(q, k, v, cu, cu, max_seqlen_q=n, out=out,  # noqa: E731
                                                            pipelined=True)
                    row["mma_async_ms"] = _time_us(mma_async, s, graph=True) / 1e3
                    row["mma_async_rel_err"] = _rel_err(out, want)
            except Exception as e:  # noqa: BLE001 -- keep the other figures
                row["mma_error"] = repr(e)[:500]
                print(f"prefill {n}: the tensor-core kernel FAILED {row['mma_error']}", flush=True)
        for key in ("numba", "numba_paged", "mma", "mma_async", "sdpa"):
            ms = row[f"{key}_ms"]
            row[f"{key}_tflops"] = None if ms is None else flops / (ms * 1e-3) / 1e12
        row["ratio"] = None if row["numba_ms"] is None else row["numba_ms"] / row["sdpa_ms"]
        row["mma_vs_sdpa"] = None if row["mma_ms"] is None else row["sdpa_ms"] / row["mma_ms"]  # >= 0.5: the target
        row["mma_async_vs_sdpa"] = None if row["mma_async_ms"] is None else row["sdpa_ms"] / row["mma_async_ms"]
        rows.append(row)
        print(f"prefill {n:6d} tok  SDPA {row['sdpa_ms']:9.3f} ms {row['sdpa_tflops']:7.1f} TFLOP/s | numba "
              + ("skipped" if row["numba_ms"] is None else
                 f"{row['numba_ms']:9.2f} ms {row['numba_tflops']:6.2f} TFLOP/s ({row['ratio']:.0f}x SDPA), "
                 f"rel err {row['numba_rel_err']:.1e}")
              + ("" if row["mma_ms"] is None else f" | tensor cores {row['mma_ms']:8.3f} ms "
                 f"({row['mma_vs_sdpa']:.3f}x SDPA's speed), rel err {row['mma_rel_err']:.1e}")
              + ("" if row["mma_async_ms"] is None else f" | pipelined {row['mma_async_ms']:8.3f} ms "
                 f"({row['mma_async_vs_sdpa']:.3f}x), rel err {row['mma_async_rel_err']:.1e}"), flush=True)
        del q, k, v, want
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"shapes": asdict(s), "peaks": {"bf16_tensor_tflops": BF16_TENSOR_TFLOPS,
                                           "fp32_fma_tflops": FP32_FMA_TFLOPS}, "prefill": rows}


# ----------------------------------------------------------------------------- decode
def _decode_kernels() -> dict[str, Callable]:
    """Label -> launcher of each paged decode kernel present (version 2 may not exist yet)."""
    found = {"paged": importlib.import_module("kernels.paged_attention").paged_attention}
    try:
        found["warp"] = importlib.import_module("kernels.paged_attention_warp").paged_attention_warp
    except ImportError:
        pass
    return found


def _decode_row(batch: int, ctx: int, s: Shapes, device: str, launchers: dict[str, Callable]) -> dict:
    elt = torch.tensor([], dtype=getattr(torch, s.dtype)).element_size()
    kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * elt
    floor_us = kv_bytes / (hbm_gbps() * 1e9) * 1e6
    width = cdiv(ctx, s.block_size)
    pool = _random(batch * width, 2, s.block_size, s.kv_heads, s.head_dim, shapes=s, device=device)
    tables = torch.randperm(batch * width, device=device).to(torch.int32).view(batch, width)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    q = _random(batch, s.q_heads, s.head_dim, shapes=s, device=device)
    k_pool, v_pool, index = pool[:, 0], pool[:, 1], tables.long()

    def gather() -> tuple[torch.Tensor, torch.Tensor]:  # (batch, kv_heads, ctx, d) each, one copy
        shape = (batch, width * s.block_size, s.kv_heads, s.head_dim)
        return tuple(x[index].view(shape)[:, :ctx].transpose(1, 2) for x in (k_pool, v_pool))

    q4 = q.unsqueeze(2)  # (batch, q_heads, 1, d)
    k, v = gather()
    how = _sdpa_how(q4, k, v, causal=False)
    k, v = _repeat_kv(q4, k, v, how)
    want = _attend(q4, k, v, False, how)[:, :, 0]
    row = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes, "floor_us": floor_us, "sdpa_backend": how,
           "sdpa_us": _time_us(lambda: _attend(q4, k, v, False, how), s, graph=True)}
    del k, v  # gather + SDPA makes its own copy
    row["gather_sdpa_us"] = _time_us(lambda: _attend(q4, *gather(), False, how), s, graph=True)
    out = torch.empty_like(q)
    for label in ("paged", "warp"):
        row[f"{label}_us"] = row[f"{label}_floor_frac"] = row[f"{label}_rel_err"] = None
        if label in launchers:
            fn = launchers[label]
            row[f"{label}_us"] = _time_us(lambda: fn(q, pool, tables, lens, out=out, max_context_len=ctx), s,
                                          graph=True)
            row[f"{label}_floor_frac"] = floor_us / row[f"{label}_us"]
            row[f"{label}_rel_err"] = _rel_err(out, want)
    row["sdpa_floor_frac"] = floor_us / row["sdpa_us"]
    return row


def _store_kv_row(tokens: int, s: Shapes, device: str) -> dict:
    from kernels.store_kv import store_kv, store_kv_ref

    key, value = (_random(tokens, s.kv_heads, s.head_dim, shapes=s, device=device) for _ in range(2))
    blocks = cdiv(2 * tokens, s.block_size)
    cache = torch.zeros(blocks, 2, s.block_size, s.kv_heads, s.head_dim, device=device, dtype=key.dtype)
    slots = torch.randperm(blocks * s.block_size, device=device)[:tokens]
    want = cache.clone()
    store_kv_ref(key, value, want, slots)
    ok = torch.equal(store_kv(key, value, cache, slots), want)
    moved = 4 * key.nbytes + slots.nbytes  # read K and V, write them, read the slots
    us = _time_us(lambda: store_kv(key, value, cache, slots), s, graph=True)
    return {"tokens": tokens, "bytes": moved, "us": us, "gbps": moved / us / 1e3,
            "floor_frac": moved / (hbm_gbps() * 1e3) / us, "correct": ok}


def run_decode(shapes: Shapes | None = None) -> dict:
    """Decode rows (batch x context) and store_kv rows."""
    s = shapes or Shapes()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launchers = _decode_kernels()
    elt = torch.tensor([], dtype=getattr(torch, s.dtype)).element_size()
    rows, skipped, errors = [], [], []
    for ctx in s.decode_contexts:
        for batch in s.decode_batches:
            if 2 * batch * ctx * s.kv_heads * s.head_dim * elt > s.max_kv_bytes:
                skipped.append([batch, ctx])
                continue
            try:
                row = _decode_row(batch, ctx, s, device, launchers)
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: record it, keep the other cases
                errors.append({"batch": batch, "context": ctx, "error": repr(e)[:500]})
                print(f"decode b {batch} ctx {ctx}: FAILED {errors[-1]['error']}", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            rows.append(row)
            kernels_txt = "  ".join(f"{k} {row[f'{k}_us']:9.1f} us ({row[f'{k}_floor_frac']:4.0%} of floor, "
                                    f"err {row[f'{k}_rel_err']:.0e})" for k in launchers)
            print(f"decode b {batch:3d} ctx {ctx:6d}  floor {row['floor_us']:8.1f} us  {kernels_txt}  gather+SDPA "
                  f"{row['gather_sdpa_us']:9.1f} us  SDPA {row['sdpa_us']:9.1f} us", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    store = []
    for tokens in s.store_tokens:
        store.append(_store_kv_row(tokens, s, device))
        r = store[-1]
        print(f"store_kv {tokens:6d} tok  {r['us']:8.1f} us  {r['gbps']:6.0f} GB/s  correct {r['correct']}")
    return {"shapes": asdict(s), "kernels": list(launchers), "floor_target": FLOOR_TARGET,
            "skipped_over_max_kv_bytes": skipped, "errors": errors, "decode": rows, "store_kv": store}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Attention benchmarks of phases 07-08.")
    parser.add_argument("parts", nargs="*", metavar="prefill|decode", help="what to measure (default: both)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; on a CPU in numba's simulator")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench.attention: no GPU here; use --smoke to check the script on a CPU")
        return 2
    shapes = SMOKE if args.smoke else Shapes()
    parts = args.parts or ["prefill", "decode"]
    if set(parts) - {"prefill", "decode"}:
        parser.error(f"parts must be prefill and/or decode, got {parts}")
    if "prefill" in parts:
        print(f"saved {save('07_attention', run_prefill(shapes), args.out)}")
    if "decode" in parts:
        print(f"saved {save('08_paged_attention', run_decode(shapes), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
