"""Where a decode step's wall time goes with CUDA graphs: host phases (synchronized) and GPU kernels.

    python -m bench.profile_engine [--batch 256] [--context 800]

Qwen3-0.6B shapes, random bf16 weights. Prints milliseconds per step for schedule / execute (inputs +
graph replay, synchronized: prepare + launch) / sample / postprocess / outputs, then the top kernels of three replayed steps.
"""

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.models import QWEN3_06B
from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=800)
    args = parser.parse_args()
    llm = LLM(QWEN3_06B, max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.6)
    engine = llm.engine
    rng = random.Random(0)
    for _ in range(args.batch):
        engine.add_request([rng.randrange(151936) for _ in range(args.context)],
                           SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
    while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    times: dict[str, float] = {}

    def timed(obj, name):
        f = getattr(obj, name)

        def g(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = f(*a, **k)
            torch.cuda.synchronize()
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
            return r
        setattr(obj, name, g)

    for obj, name in ((engine.scheduler, "schedule"), (engine.runner, "prepare"), (engine.runner, "launch"),
                      (engine, "sample"), (engine.scheduler, "postprocess"), (engine.processor, "process")):
        timed(obj, name)
    steps = 30
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / steps * 1e3
    print(f"batch {args.batch}, context ~{args.context}: {total:.2f} ms/step;",
          {k: round(v / steps * 1e3, 2) for k, v in times.items()}, flush=True)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
