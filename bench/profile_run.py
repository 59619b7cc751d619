"""Where the offline workload's GPU time goes, over the whole run: every kernel, and the floors it is held to.

    python -m bench.profile_run [--out DIR]     # GPU only; writes 17_run_profile_cuda.json

The workload and engine of ``bench.throughput --device cuda`` (256 requests, prompt and output lengths uniform in
100..1024, Qwen3-0.6B shapes, random bf16 weights, the engine's defaults). Two engines in turn: the first runs the
workload as the throughput benchmark does (its figure of record here); the second, fresh (so that no prompt is
already cached), runs it again under ``torch.profiler`` with CUPTI, which reports every kernel each CUDA graph
replays. From the profile:

* **busy**: the union of the kernels' time intervals; the rest of the span is the GPU idle (waiting on the host,
  or between two kernels);
* **by category**: decode attention, prefill attention, matmuls (cuBLAS), QK-norm + RoPE + KV store, norms, ...;
* **by window**: each half-second's busy share and decode attention's share (the run's tail, where the batch
  shrinks, shows up here);
* **a layer's matmuls** (cuBLAS) at decode batch sizes, replayed from a CUDA graph, against their weights' floor;
* **floors**: the bytes the run must read at the least -- every decode step's cached keys and values (each
  request's decode step ``j`` reads ``prompt + j`` tokens of it, all layers) and the weights once per step --
  divided by the HBM bandwidth measured in the same process (``bench._harness.hbm_gbps``); and decode attention's
  time against its own floor.

Left out: the host's side (``bench.step_breakdown`` times the engine's phases) and single kernels' tuning
(``bench.paged_decode``, ``bench.kernel_floor``).
"""

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

from bench._harness import RESULTS, engine_config, free_memory, hbm_gbps, model_spec, save

NAME = "17_run_profile_cuda"
CATEGORIES = (("paged_decode", "decode attention"), ("flash", "prefill attention"),
              ("qkv_prep", "qk-norm+rope+kv store"), ("rms_norm", "norms"), ("silu", "silu*mul"),
              ("gemv", "gemv (ours)"), ("nvjet", "matmul (cuBLAS)"), ("gemm", "matmul (cuBLAS)"),
              ("cutlass", "matmul (cuBLAS)"), ("argmax", "sampling"), ("memcpy", "copies"), ("memset", "copies"),
              ("copy_kernel", "copies"))
WINDOW_S = 0.5


def category(kernel: str) -> str:
    low = kernel.lower()
    return next((c for key, c in CATEGORIES if key in low), "other torch ops")


def kv_bytes_per_token(mc) -> int:
    return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 2  # K and V, every layer, bf16


def floors(mc, prompts: list[list[int]], max_tokens: list[int], decode_steps: int, gbps: float) -> dict:
    """The least the run must read (decode attention's cached keys and values, the weights once a step), as
    seconds at ``gbps``. A request's first token comes from its prefill; its decode step j = 1..n-1 attends
    over its prompt and j tokens."""
    tokens = sum(len(p) * (n - 1) + n * (n - 1) // 2 for p, n in zip(prompts, max_tokens))
    kv = tokens * kv_bytes_per_token(mc)
    params = (mc.vocab_size * mc.hidden_size + mc.num_hidden_layers * (
        mc.hidden_size * (mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_dim
        + mc.num_attention_heads * mc.head_dim * mc.hidden_size + 3 * mc.hidden_size * mc.intermediate_size))
    weights = decode_steps * params * 2
    return {"hbm_gbps": gbps, "decode_context_tokens": tokens, "kv_bytes": kv, "kv_floor_s": round(kv / gbps / 1e9, 3),
            "weight_bytes_per_step": params * 2, "decode_steps": decode_steps,
            "weights_floor_s": round(weights / gbps / 1e9, 3)}


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals in µs, as seconds."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e6


def layer_matmuls(mc, rows: tuple[int, ...] = (8, 32, 64, 128, 192, 256), gbps: float | None = None) -> list[dict]:
    """One layer's four matmuls (``F.linear``, cuBLAS) at decode batch sizes, timed as a CUDA graph replays them
    (as the engine's decode graphs do), against the time their weights take to read at ``gbps``."""
    import torch.nn.functional as F

    from kernels._timing import graph_time

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"qkv_proj": ((mc.num_attention_heads + 2 * mc.num_key_value_heads) * mc.head_dim, mc.hidden_size),
              "o_proj": (mc.hidden_size, mc.num_attention_heads * mc.head_dim),
              "gate_up_proj": (2 * mc.intermediate_size, mc.hidden_size),
              "down_proj": (mc.hidden_size, mc.intermediate_size)}
    weights = {k: torch.randn(*v, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for k, v in shapes.items()}
    floor_us = sum(w.numel() * 2 for w in weights.values()) / (gbps or hbm_gbps()) / 1e3
    table = []
    for m in rows:
        xs = {k: torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16, generator=gen)
              for k, w in weights.items()}
        row = {"rows": m}
        for k, w in weights.items():
            row[f"{k}_us"] = round(graph_time(lambda: F.linear(xs[k], w)).median_us, 2)
        row["layer_us"] = round(sum(row[f"{k}_us"] for k in weights), 2)
        row["weights_floor_us"] = round(floor_us, 2)
        table.append(row)
    return table


def run() -> dict:
    from torch.profiler import ProfilerActivity, profile

    from bench.throughput import fill_defaults, parser, run_engine, workload
    from minivllm.llm import LLM

    device = torch.device("cuda")
    args = fill_defaults(parser().parse_args(["--device", "cuda", "--peer-requests", "0"]))
    name, mc = model_spec(None, device)
    prompts, max_tokens = workload(name, mc, args)
    options = dict(max_model_len=max(len(p) + n for p, n in zip(prompts, max_tokens)) + 16,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    gbps = hbm_gbps()
    runs = {}
    for label in ("unprofiled", "profiled"):  # a fresh engine each: no prompt of the run is in its cache yet
        llm = LLM(**engine_config(name, mc, device, **options))
        run_engine(llm, [[1, 2, 3], [4, 5, 6, 7]], [4, 4], device)  # warm-up (its prompts are not the run's)
        if label == "unprofiled":
            runs[label] = run_engine(llm, prompts, max_tokens, device)
        else:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runs[label] = run_engine(llm, prompts, max_tokens, device)
        runs[label].pop("_tokens")
        print(label, {k: runs[label][k] for k in ("seconds", "output_tokens_per_s", "steps")})
        del llm
        free_memory()
    started = time.perf_counter()
    events = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0)
    parse_s = time.perf_counter() - started
    t0, t1 = events[0][0], max(e for _, e, _ in events)
    busy = union_seconds([(s, e) for s, e, _ in events])
    by_cat, launches, by_kernel = collections.defaultdict(float), collections.Counter(), collections.defaultdict(float)
    windows = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for s, e, kernel in events:
        c = category(kernel)
        by_cat[c] += (e - s) / 1e6
        launches[c] += 1
        by_kernel[kernel.split("(")[0].split("<")[0].removeprefix("void ")[:90]] += (e - s) / 1e6
        w = windows[int((s - t0) / 1e6 // WINDOW_S)]
        w[0] += (e - s) / 1e6
        w[1] += (e - s) / 1e6 if c == "decode attention" else 0.0
        w[2] += 1
    span = (t1 - t0) / 1e6
    fl = floors(mc, prompts, max_tokens, runs["profiled"]["decode_only_steps"], gbps)
    attn = by_cat["decode attention"]
    result = {
        "workload": {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                     "output_tokens": sum(max_tokens), "lengths": f"U[{args.min_len},{args.max_len}]"},
        "runs": runs,
        "profile": {"kernels": len(events), "span_s": round(span, 3), "busy_s": round(busy, 3),
                    "idle_s": round(span - busy, 3), "busy_share": round(busy / span, 3),
                    "parse_s": round(parse_s, 1)},
        "by_category": sorted(({"category": c, "seconds": round(v, 3), "share_of_busy": round(v / busy, 3),
                                "launches": launches[c], "us_each": round(v / launches[c] * 1e6, 1)}
                               for c, v in by_cat.items()), key=lambda r: -r["seconds"]),
        "top_kernels": [{"kernel": k, "seconds": round(v, 3)}
                        for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:20]],
        "windows": [{"start_s": w * WINDOW_S, "busy_share": round(v[0] / WINDOW_S, 3),
                     "decode_attention_share": round(v[1] / WINDOW_S, 3), "kernels": v[2]}
                    for w, v in sorted(windows.items())],
        "floors": {**fl, "decode_attention_vs_kv_floor": round(fl["kv_floor_s"] / attn, 3) if attn else None,
                   "run_floor_s": round(fl["kv_floor_s"] + fl["weights_floor_s"], 3)},
    }
    result["layer_matmuls"] = layer_matmuls(mc, gbps=gbps)
    print(f"span {span:.3f} s, busy {busy:.3f} s ({busy / span:.0%}); KV floor {fl['kv_floor_s']} s, "
          f"decode attention {attn:.3f} s ({fl['kv_floor_s'] / attn:.0%} of its floor)")
    for r in result["by_category"]:
        print(f"  {r['category']:24s} {r['seconds']:7.3f} s {r['share_of_busy']:6.1%} {r['launches']:8d} launches")
    for r in result["layer_matmuls"]:
        print(f"  one layer's matmuls at {r['rows']:3d} rows: {r['layer_us']:6.1f} us (weights floor "
              f"{r['weights_floor_us']:.1f})")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.profile_run profiles a GPU run; this machine has no GPU", file=sys.stderr)
        return 2
    print(f"saved {save(NAME, run(), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
