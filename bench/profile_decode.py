"""Where a decode step's time goes inside its CUDA graph: every replayed kernel, timed by the profiler.

    python -m bench.profile_decode [--steps 20] [--out DIR]     # GPU only; writes 17_decode_profile_cuda.json
    python -m bench.profile_decode --batch 192                  # a throughput-sized step: ..._cuda_b192.json

Qwen3-0.6B shapes, random bf16 weights, the engine's defaults (a CUDA graph per decode batch size). By default
one request (16-token prompt) decodes. With ``--batch N``, N requests with prompts of 100..1024 tokens (uniform,
seeded, as in ``bench.throughput``'s workload) are prefilled first, then decode together. After a warm-up,
``--steps`` steps run under ``torch.profiler`` (CUPTI reports each kernel a graph replays). Per kernel name:
launches per step, GPU time per step and per launch. Per step: the wall time between steps, the GPU busy time
(sum of kernel durations), and the span from the step's first kernel start to its last kernel end -- the span
minus the busy time is the GPU idle *between* the graph's kernels (each kernel's ramp-up and drain), the wall
minus the span is the host's part.
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench._harness import RESULTS, save

NAME = "17_decode_profile_cuda"


def _short(name: str) -> str:
    for cut in ("(", "<"):
        name = name.split(cut)[0]
    return name.removeprefix("void ")[:70]


def run(steps: int, batch: int = 1) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from bench.models import QWEN3_06B
    from minivllm.llm import LLM
    from minivllm.sampling_params import SamplingParams

    llm = LLM(QWEN3_06B, max_model_len=2048, max_num_seqs=max(8, batch), gpu_memory_utilization=0.5)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 64, ignore_eos=True)
    if batch == 1:
        engine.add_request(list(range(100, 116)), params)
    else:
        import random

        from bench._harness import random_ids

        rng = random.Random(0)
        for _ in range(batch):
            engine.add_request(random_ids(rng, rng.randint(100, 1024), QWEN3_06B.vocab_size), params)
    while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    for _ in range(20):  # decode steps: the graph is captured and warm
        engine.step()
    torch.cuda.synchronize()
    walls = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e6)
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.time_range.elapsed_us() > 0 and "Memcpy" not in e.name and "Memset" not in e.name),
                     key=lambda e: e.time_range.start)
    # split the kernel stream into steps at the largest gaps (a host sync separates steps)
    gaps = sorted(range(1, len(kernels)), key=lambda i: kernels[i].time_range.start - kernels[i - 1].time_range.end)
    cuts = sorted(gaps[-(steps - 1):]) if steps > 1 else []
    groups, last = [], 0
    for c in [*cuts, len(kernels)]:
        groups.append(kernels[last:c])
        last = c
    per_step = [{"kernels": len(g), "busy_us": sum(e.time_range.elapsed_us() for e in g),
                 "span_us": g[-1].time_range.end - g[0].time_range.start} for g in groups if g]
    by_name = defaultdict(list)
    for e in kernels:
        by_name[_short(e.name)].append(e.time_range.elapsed_us())
    table = sorted(({"kernel": k, "per_step": round(len(v) / steps, 2), "us_per_step": round(sum(v) / steps, 2),
                     "us_each": round(statistics.median(v), 2)} for k, v in by_name.items()),
                   key=lambda r: -r["us_per_step"])
    summary = {"steps": steps, "batch": batch, "context_tokens": sum(s.num_tokens for s in engine.scheduler.running),
               "wall_us_median": round(statistics.median(walls), 1),
               "kernels_per_step": statistics.median(s["kernels"] for s in per_step),
               "busy_us_median": round(statistics.median(s["busy_us"] for s in per_step), 1),
               "span_us_median": round(statistics.median(s["span_us"] for s in per_step), 1)}
    print(summary)
    for r in table[:30]:
        print(f"{r['kernel']:70s} {r['per_step']:6.1f}/step {r['us_per_step']:8.1f} us/step "
              f"{r['us_each']:6.2f} us each")
    return {"summary": summary, "kernels": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="requests decoding together (prompts of 100..1024 tokens)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.profile_decode profiles a GPU; this machine has no GPU", file=sys.stderr)
        return 2
    name = NAME if args.batch == 1 else f"{NAME}_b{args.batch}"
    print(f"saved {save(name, run(args.steps, args.batch), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
