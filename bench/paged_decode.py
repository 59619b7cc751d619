"""Paged decode attention on the GPU: ``kernels.paged_attention_warp``'s launch settings against the
KV-bandwidth floor, every setting in the same run.

    python -m bench.paged_decode [--out DIR]        # GPU only; writes 17_paged_decode_cuda.json

Qwen3-0.6B's attention (16 query / 8 KV heads x 128, bf16, 16-token blocks in shuffled order). A setting is
(warps per block, tokens per lane group per trip); each is first checked against ``paged_attention_ref``, then
timed by CUDA-graph replay on every case:

* the cases of the floor target (>= 70% at batch >= 32, context >= 2k): batch 32 / 64 / 256 at 2k and 8k keys;
* the offline workload's decode steps: batch 139 at ~850 tokens (bench.throughput's mean), one context for
  all and contexts spread over 200..1,500;
* small batches as the engine's graphs call them (``max_context_len`` = 2,060, the workload's
  ``max_model_len``), where split-K decides the time; for these the smallest split chunk is swept too;
* then, with the best setting, the largest split chunk (``MAX_SPLIT``) on the batch >= 32 cases: a full grid
  cut into even chunks, against whole contexts per block (``none``) -- the waves of blocks, see the kernel;
* and the rule that splits a grid smaller than one wave (``SPLIT_RULE``: "waves" keeps it within one wave,
  "fill" is the earlier rule) on every case;
* last, the defaults on an fp8 (e4m3) copy of every case's pool (``kv_cache_dtype="fp8"``): its own floor is
  half of bf16's, and its time is set beside the bf16 defaults' (``fp8_cache``); on sm_89+ also the bytes widened by
  masks and shifts instead of the hardware's conversion (``us_shift_widening``);
* and the small batches with split-K merged in the kernel's last block instead of a second kernel
  (``fused_merge_us``, ``kernels.paged_attention_warp.FUSED_MERGE``) and with the second kernel
  (``two_kernel_merge_us``).

The floor is the K and V bytes read / the bandwidth this GPU reaches in a plain copy (``bench._harness.hbm_gbps``).
The best setting is the one with the least total time over the batch >= 32 cases; the module's defaults are
reported next to it.
"""

import random
from collections.abc import Callable

import torch

from bench._harness import hbm_gbps, kernel_bench_main

NAME = "17_paged_decode_cuda"
Q_HEADS, KV_HEADS, DIM, BLOCK = 16, 8, 128, 16
GRAPH_MAX_LEN = 2060  # bench.throughput's max_model_len: what the engine's graphs pass as max_context_len
SETTINGS = [(4, 1), (4, 2), (4, 4), (4, 8), (8, 4), (2, 4)]  # (warps, unroll)
MIN_SPLITS = (32, 64, 128, 256)
MAX_SPLITS = (None, 256, 512, 1024)
SPLIT_RULES = ("waves", "fill")
FLOOR_TARGET = 0.7
CHECK = (8, 1000)  # each setting's answer is checked first on this many sequences of up to this many keys


def case(name: str, lens: list[int], *, graph_max: int | None = None, seed: int = 0, device: str = "cuda") -> dict:
    """A decode batch with these context lengths, its blocks in shuffled order, and its floor in µs."""
    g = torch.Generator(device=device).manual_seed(seed)
    width = -(-max(lens) // BLOCK)
    num_blocks = len(lens) * width
    cache = torch.randn(num_blocks, 2, BLOCK, KV_HEADS, DIM, generator=g, device=device, dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32).view(len(lens), width)
    q = torch.randn(len(lens), Q_HEADS, DIM, generator=g, device=device, dtype=torch.bfloat16)
    if graph_max is not None:  # the engine's graphs: a table as wide as max_model_len
        pad = torch.zeros(len(lens), -(-graph_max // BLOCK) - width, dtype=torch.int32, device=device)
        tables = torch.cat([tables, pad], 1)
    kv_bytes = 2 * sum(lens) * KV_HEADS * DIM * 2
    return {"name": name, "batch": len(lens), "mean_context": round(sum(lens) / len(lens)), "lens": lens,
            "max_context_len": graph_max or max(lens), "floor_us": kv_bytes / (hbm_gbps() * 1e3),
            "tensors": (q, cache, tables, torch.tensor(lens, dtype=torch.int32, device=device))}


def cases() -> list[dict]:
    rng = random.Random(0)
    out = [case(f"b{b}_ctx{c}", [c] * b) for b in (32, 64, 256) for c in (2048, 8192)]
    out.append(case("workload_b139_ctx850", [850] * 139))
    out.append(case("workload_b139_mixed", [rng.randint(200, 1500) for _ in range(139)]))
    out.append(case("graph_b1_ctx300", [300], graph_max=GRAPH_MAX_LEN))
    out.append(case("graph_b8_mixed", [rng.randint(100, 1500) for _ in range(8)], graph_max=GRAPH_MAX_LEN))
    return out


def run(all_cases: list[dict] | None = None, timer: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """Every setting on every case (printed as it goes); the data of ``17_paged_decode_cuda.json``. ``timer``:
    µs per call of a function (default: CUDA-graph replay); a test passes CPU cases and a stand-in."""
    import kernels.paged_attention_warp as w
    from kernels._timing import graph_time
    from kernels.paged_attention import paged_attention_ref

    defaults = {"warps": w.WARPS, "unroll": w.UNROLL16, "min_split": w.MIN_SPLIT, "max_split": w.MAX_SPLIT,
                "split_rule": w.SPLIT_RULE}
    if timer is None:
        def timer(fn):
            return graph_time(fn, reps=10, iters=5).median_us
    all_cases = cases() if all_cases is None else all_cases
    device = all_cases[0]["tensors"][0].device.type
    check = case("check", [random.Random(1).randint(1, CHECK[1]) for _ in range(CHECK[0])], seed=1, device=device)
    want = paged_attention_ref(*check["tensors"]).float()

    def call(c: dict, warps: int, unroll: int) -> torch.Tensor:
        return w.paged_attention_warp(*c["tensors"], max_context_len=c["max_context_len"], warps=warps,
                                      unroll=unroll)

    results: dict[str, dict] = {}
    for warps, unroll in SETTINGS:
        key = f"w{warps}_u{unroll}"
        err = (call(check, warps, unroll).float() - want).abs().max().item()
        row = {"warps": warps, "unroll": unroll, "max_abs_err": err, "us": {}, "floor_fraction": {}}
        for c in all_cases:
            us = timer(lambda c=c: call(c, warps, unroll))
            row["us"][c["name"]] = round(us, 2)
            row["floor_fraction"][c["name"]] = round(c["floor_us"] / us, 3)
        big = [c["name"] for c in all_cases if c["batch"] >= 32]
        row["total_us_batch_ge_32"] = round(sum(row["us"][n] for n in big), 1)
        results[key] = row
        print(f"{key:7s} err {err:.1e} | " + " ".join(f"{n} {row['us'][n]:.1f}us {row['floor_fraction'][n]:.0%}"
                                                        for n in row["us"]), flush=True)
    best_key = min(results, key=lambda k: results[k]["total_us_batch_ge_32"] if results[k]["max_abs_err"] < 5e-2
                   else float("inf"))
    best = results[best_key]
    def sweep(attr: str, values, cases: list[dict], label) -> dict:
        """Each value of the module's ``attr`` (restored after) with the best setting, on ``cases``: µs per case,
        by ``label(value)``."""
        saved, out = getattr(w, attr), {}
        try:
            for value in values:
                setattr(w, attr, value)
                out[label(value)] = {c["name"]: round(timer(lambda c=c: call(c, best["warps"], best["unroll"])), 2)
                                     for c in cases}
                print(f"{attr} {value}: {out[label(value)]}", flush=True)
        finally:
            setattr(w, attr, saved)
        return out

    def fastest(timed: dict):
        return min(timed, key=lambda value: sum(timed[value].values()))

    small = [c for c in all_cases if c["batch"] < 32]
    large = [c for c in all_cases if c["batch"] >= 32]
    split_us = sweep("MIN_SPLIT", MIN_SPLITS, small, lambda ms: ms)
    max_split_us = sweep("MAX_SPLIT", MAX_SPLITS, large, lambda ms: str(ms).lower())  # "none": whole contexts
    rule_us = sweep("SPLIT_RULE", SPLIT_RULES, all_cases, str)
    best_split, best_max, best_rule = fastest(split_us), fastest(max_split_us), fastest(rule_us)
    d = results.get(f"w{defaults['warps']}_u{defaults['unroll']}")  # the defaults' row, if they were swept
    fp8 = fp8_cache_row(all_cases, check, timer, d["us"] if d is not None else None)
    fused, two = ({c["name"]: round(timer(lambda c=c: w.paged_attention_warp(  # split-K merged in the kernel, or not
        *c["tensors"], max_context_len=c["max_context_len"], fused_merge=merge)), 2) for c in small}
        for merge in (True, False))
    print("fused merge: " + " ".join(f"{n} {us:.1f}us (two kernels {two[n]:.1f}us)" for n, us in fused.items()),
          flush=True)
    target_cases = [c["name"] for c in all_cases if c["name"].startswith("b")]
    floors = {c["name"]: c["floor_us"] for c in all_cases}
    summary = {"best": {"warps": best["warps"], "unroll": best["unroll"], "min_split": best_split,
                        "max_split": None if best_max == "none" else int(best_max), "split_rule": best_rule},
               "defaults": defaults,
               "best_floor_fraction_batch_ge_32_ctx_ge_2k": {n: best["floor_fraction"][n] for n in target_cases},
               "defaults_meet": None}
    if d is not None:
        summary["defaults_meet"] = all(d["floor_fraction"][n] >= FLOOR_TARGET for n in target_cases)
    print(f"best: {summary['best']} (defaults {defaults}); fractions of the floor at batch >= 32, ctx >= 2k: "
          f"{summary['best_floor_fraction_batch_ge_32_ctx_ge_2k']}")
    return {"shapes": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "block_size": BLOCK,
                       "dtype": "bfloat16"},
            "cases": [{k: v for k, v in c.items() if k not in ("tensors", "lens")} for c in all_cases],
            "settings": results, "min_split_us": split_us, "max_split_us": max_split_us,
            "max_split_floor_fraction": {ms: {n: round(floors[n] / us, 3) for n, us in row.items()}
                                         for ms, row in max_split_us.items()},
            "split_rule_us": rule_us, "fp8_cache": fp8, "fused_merge_us": fused, "two_kernel_merge_us": two,
            "floor_target": FLOOR_TARGET, **summary}


def fp8_cache_row(all_cases: list[dict], check: dict, timer, bf16_us: dict | None) -> dict:
    """The module's defaults on an fp8 (e4m3) copy of each case's pool: half the bytes, so half the floor."""
    import kernels.paged_attention_warp as w
    from kernels.paged_attention import paged_attention_ref

    def fp8(c: dict) -> tuple:
        q, cache, tables, lens = c["tensors"]
        return q, cache.to(torch.float8_e4m3fn), tables, lens

    args = fp8(check)
    err = (w.paged_attention_warp(*args).float() - paged_attention_ref(*args).float()).abs().max().item()
    row = {"max_abs_err_vs_fp8_reference": err, "us": {}, "floor_fraction": {}, "speedup_vs_bf16_defaults": {}}
    for c in all_cases:
        args = fp8(c)
        us = timer(lambda args=args, c=c: w.paged_attention_warp(*args, max_context_len=c["max_context_len"]))
        row["us"][c["name"]] = round(us, 2)
        row["floor_fraction"][c["name"]] = round(c["floor_us"] / 2 / us, 3)
        if bf16_us is not None:
            row["speedup_vs_bf16_defaults"][c["name"]] = round(bf16_us[c["name"]] / us, 3)
    print(f"fp8 cache err {err:.1e} | " + " ".join(f"{n} {row['us'][n]:.1f}us {row['floor_fraction'][n]:.0%}"
                                                   f" x{row['speedup_vs_bf16_defaults'].get(n, 0):.2f}"
                                                   for n in row["us"]), flush=True)
    dev = check["tensors"][0].device
    if dev.type == "cuda" and w._has_cvt(dev.index or 0):  # the masks-and-shifts widening, for comparison
        row["us_shift_widening"] = {}
        for c in all_cases:
            args = fp8(c)
            row["us_shift_widening"][c["name"]] = round(timer(lambda args=args, c=c: w.paged_attention_warp(
                *args, max_context_len=c["max_context_len"], fp8_cvt=False)), 2)
        print("fp8, masks and shifts: " + " ".join(f"{n} {us:.1f}us" for n, us in row["us_shift_widening"].items()),
              flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    return kernel_bench_main("bench.paged_decode", __doc__, NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
