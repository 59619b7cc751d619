"""Where a step's GPU time goes: torch.profiler over eager decode and prefill steps of the engine.

    python -m bench.profile_step [--batch 64] [--context 512]

Qwen3-0.6B shapes, random bf16 weights; prints the kernels by total CUDA time (numba kernels included).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.models import QWEN3_06B
from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    llm = LLM(QWEN3_06B, max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192, enforce_eager=True,
              gpu_memory_utilization=0.3)
    engine = llm.engine
    g = torch.Generator().manual_seed(1)
    for _ in range(args.batch):
        engine.add_request(torch.randint(0, 151936, (args.context,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()  # prefill (up to max_num_batched_tokens)
        torch.cuda.synchronize()
    print(f"== prefill step: {engine.step_log[-1].num_prefill_tokens} tokens")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    print(f"== 5 decode steps of {args.batch} sequences at ~{args.context} tokens")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))


if __name__ == "__main__":
    main()
