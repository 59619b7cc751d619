"""Decode attention's two orders on the GPU: the step's rows (arrival, or longest context first) and the kernel's grid
(KV heads first, or sequences first), every combination in the same run, against the KV-bandwidth floor.

    python -m bench.decode_order [--out DIR]        # GPU only; writes 17_decode_order_cuda.json

A GPU hands out a grid's blocks in order, x first. ``kernels.paged_attention_warp``'s 16-byte kernel has a block
per (KV head, sequence, split): with ``HEADS_FIRST`` its grid is (kv_heads, seqs, splits), so a sequence's heads go
out one after another; otherwise (seqs, kv_heads, splits), every sequence's first head before any second head. The
scheduler lays a step's decode rows out longest context first (``minivllm.scheduler.row_order``), so that the
longest sequences' blocks start first instead of finishing last on a half-empty GPU. Each case here is a batch of
contexts drawn uniformly (Qwen3-0.6B's heads, bf16, 16-token blocks in shuffled order, tables as wide as the
engine's graphs make them); each combination is timed by CUDA-graph replay and its output compared, row for row,
with the first combination's (a different order must change nothing but the time). The floor is the K and V bytes
read / the bandwidth this GPU reaches in a plain copy (``bench._harness.hbm_gbps``).
"""

import random
from collections.abc import Callable

import torch

from bench._harness import kernel_bench_main
from bench.paged_decode import GRAPH_MAX_LEN, case

NAME = "17_decode_order_cuda"
CASES = ((139, 200, 1500), (139, 100, 2048), (64, 100, 2048), (200, 100, 2048), (256, 100, 2048), (139, 850, 850),
         (32, 2048, 2048))  # (batch, shortest, longest context): the offline workload's mean batch and its spread
ORDERS = ("arrival", "longest_first")
GRIDS = ("heads_first", "seqs_first")


def cases(device: str = "cuda") -> list[dict]:
    rng = random.Random(1)
    return [case(f"b{b}_ctx{lo}_{hi}", [rng.randint(lo, hi) for _ in range(b)], graph_max=GRAPH_MAX_LEN,
                 device=device) for b, lo, hi in CASES]


def run(all_cases: list[dict] | None = None, timer: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """Every (row order, grid) on every case; the data of ``17_decode_order_cuda.json``. ``timer``: µs per call of a
    function (default: CUDA-graph replay); a test passes CPU cases and a stand-in."""
    import kernels.paged_attention_warp as w
    from kernels._timing import graph_time

    if timer is None:
        def timer(fn):
            return graph_time(fn, reps=20, iters=20).median_us
    all_cases = cases() if all_cases is None else all_cases
    default = {"grid": "heads_first" if w.HEADS_FIRST else "seqs_first", "rows": "longest_first"}
    rows, saved = [], w.HEADS_FIRST
    try:
        for c in all_cases:
            q, cache, tables, lens = c["tensors"]
            row = {k: c[k] for k in ("name", "batch", "mean_context", "max_context_len")}
            row["floor_us"] = round(c["floor_us"], 2)
            row["us"], row["floor_fraction"], outs = {}, {}, {}
            for order in ORDERS:
                perm = (torch.argsort(lens.cpu(), descending=True, stable=True) if order == "longest_first"
                        else torch.arange(len(lens))).to(q.device)
                qq, tt, cc = q[perm].contiguous(), tables[perm].contiguous(), lens[perm].contiguous()
                back = torch.argsort(perm)
                for grid in GRIDS:
                    w.HEADS_FIRST = grid == "heads_first"
                    out = torch.empty_like(qq)

                    def call(qq=qq, tt=tt, cc=cc, out=out, c=c):
                        return w.paged_attention_warp(qq, cache, tt, cc, out=out, max_context_len=c["max_context_len"])

                    call()
                    outs[(order, grid)] = out[back].clone()  # rows back in arrival order
                    key = f"{order}/{grid}"
                    us = timer(call)
                    row["us"][key] = round(us, 2)
                    row["floor_fraction"][key] = round(c["floor_us"] / us, 3)
            first = next(iter(outs.values()))
            row["same_output"] = all(torch.equal(first, o) for o in outs.values())
            row["fastest"] = min(row["us"], key=row["us"].get)
            rows.append(row)
            print(f"{c['name']:22s} floor {c['floor_us']:7.1f} us | " + "  ".join(
                f"{k} {us:7.1f} ({row['floor_fraction'][k]:.0%})" for k, us in row["us"].items())
                + f" | same output {row['same_output']}", flush=True)
    finally:
        w.HEADS_FIRST = saved
    keys = list(rows[0]["us"])
    total = {k: round(sum(r["us"][k] for r in rows), 1) for k in keys}
    return {"shapes": {"q_heads": q.shape[1], "kv_heads": cache.shape[3], "head_dim": q.shape[2],
                       "block_size": cache.shape[2], "dtype": str(q.dtype).removeprefix("torch.")},
            "cases": rows, "total_us": total, "fastest_overall": min(total, key=total.get),
            "default": f"{default['rows']}/{default['grid']}",
            "all_outputs_equal": all(r["same_output"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    return kernel_bench_main("bench.decode_order", __doc__, NAME, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
