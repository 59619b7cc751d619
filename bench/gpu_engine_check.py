"""A quick look at the engine on a GPU: Qwen3-0.6B shapes, random bf16 weights, CUDA graphs vs eager.

    python -m bench.gpu_engine_check          # prints load/capture times, tokens/s, graph-vs-eager agreement

Not a benchmark of record (bench/throughput.py and bench/latency.py are): a smoke test that the decode
graphs capture and replay, and a first number.
"""

import time

import torch

from bench.models import QWEN3_06B
from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams


def run(enforce_eager: bool, prompts, params, utilization: float) -> tuple[list[list[int]], float, float]:
    t0 = time.perf_counter()
    llm = LLM(QWEN3_06B, max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192,
              enforce_eager=enforce_eager, gpu_memory_utilization=utilization)
    setup = time.perf_counter() - t0
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"enforce_eager={enforce_eager}: set-up {setup:.1f} s, {llm.engine.num_kv_blocks} KV blocks, "
          f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tok/s, "
          f"{sum(r.graph for r in llm.engine.step_log)} graph steps of {len(llm.engine.step_log)}", flush=True)
    result = [o.outputs[0].token_ids for o in outs]
    del llm
    torch.cuda.empty_cache()
    return result, setup, seconds


def main() -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151936, (int(n),), generator=g).tolist() for n in torch.randint(100, 1025, (64,), generator=g)]
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in torch.randint(100, 513, (64,), generator=g)]
    graphs, _, _ = run(False, prompts, params, 0.4)  # NOTE: the first engine's memory is not all returned
    eager, _, _ = run(True, prompts, params, 0.85)
    same = sum(a == b for a, b in zip(graphs, eager))
    first = sum(a[:16] == b[:16] for a, b in zip(graphs, eager))
    print(f"graph vs eager greedy: {same}/{len(prompts)} identical, {first}/{len(prompts)} agree on 16 tokens")


if __name__ == "__main__":
    main()
