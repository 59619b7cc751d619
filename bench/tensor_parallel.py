"""Tensor parallelism: the same offline workload at TP = 1, 2, 4 ..., tokens/s, scaling efficiency, batch-1 latency.

    python -m bench.tensor_parallel                                  # GPUs if any: Qwen3-8B shapes, TP 1/2/4
    python -m bench.tensor_parallel --device cuda --tp 1,2,4,8 --config qwen3-8b
    python -m bench.tensor_parallel --device cuda --enforce-eager    # TP=1 without CUDA graphs too (TP > 1 has none)
    python -m bench.tensor_parallel --device cpu                     # tiny random model, TP 1/2 over gloo
    python -m bench.tensor_parallel --device cpu --config default --num-requests 8   # the embedded SmolLM2

For each TP size the engine is built (``LLM(..., tensor_parallel_size=tp)``: rank 0 here, a worker process per
other rank), then measured twice:

* **offline throughput**: ``--num-requests`` requests of random token ids, input and output lengths uniform in
  ``--min-len`` .. ``--max-len`` (seeded, the same for every TP size), greedy, ``ignore_eos``, one ``generate``
  call; output tokens/s and the scaling efficiency ``tokens/s(tp) / (tp * tokens/s(1))``;
* **batch-1 latency**: one request, ``--latency-tokens`` tokens, milliseconds per decoded token (from the engine's
  step log: decode-only steps).

Random models get random weights per rank (``seed + rank``): the TP sizes compute on different numbers, the same
shapes. Every figure is stored with the machine's load average beside it: on a shared CPU, compare the TP sizes
of one run (ratios), not runs with each other. Results: ``bench/results/18_tensor_parallel_<device>_<config>.json``.

Left out: online serving under load (bench.latency), pipeline parallelism, CUDA graphs (off when tp > 1).
"""

import argparse
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench._harness: spinning OpenMP threads on a shared CPU

import torch  # noqa: E402

from bench._harness import RESULTS, free_memory, random_ids, resolve_device, save, sync  # noqa: E402
from bench.models import RANDOM_MODELS  # noqa: E402
from minivllm.model.config import ModelConfig  # noqa: E402

# Qwen3-8B's config.json (random bf16 weights: ~16 GB; ~8 GB per rank at TP=2)
QWEN3_8B = ModelConfig(architecture="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                       tie_word_embeddings=False, qk_norm=True)
MODELS = {**RANDOM_MODELS, "qwen3-8b": QWEN3_8B}  # "default": the embedded GGUF


def build(config: str, device: torch.device, tp: int, args: argparse.Namespace):
    from minivllm.llm import LLM

    options = dict(device=device.type, tensor_parallel_size=tp, seed=args.seed, enforce_eager=args.enforce_eager,
                   max_num_seqs=args.max_num_seqs, max_model_len=2 * args.max_len + args.latency_tokens)
    if device.type == "cpu":
        options["dtype"] = "float32" if config != "default" else "auto"  # the GGUF: the engine's fp16 linears
    return LLM(MODELS.get(config), **options)


def measure(llm, prompts: list[list[int]], outs: list[int], latency_prompt: list[int], args, device) -> dict:
    from minivllm.sampling_params import SamplingParams

    engine = llm.engine
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)  # warm
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outs]
    sync(device)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - start
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    first = len(engine.step_log)
    load_mid = os.getloadavg()[0]
    llm.generate(latency_prompt, SamplingParams(max_tokens=args.latency_tokens, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    decode = [r for r in list(engine.step_log)[first:] if r.num_prefill_tokens == 0]
    step_ms = [1000 * (r.end - r.start) for r in decode[1:]]  # the first decode step may still warm up
    return {"output_tokens": generated, "seconds": round(seconds, 3),
            "output_tokens_per_s": round(generated / seconds, 1),
            "batch1_ms_per_token": round(statistics.median(step_ms), 2) if step_ms else None,
            "num_kv_blocks": engine.num_kv_blocks, "num_preemptions": engine.scheduler.num_preemptions,
            "loadavg_1min": [round(load_before, 2), round(load_mid, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--config", default=None, help=f"one of {sorted(MODELS)} or 'default' (default: qwen3-8b "
                                                       "on GPUs, tiny on a CPU)")
    parser.add_argument("--tp", default=None, help="comma-separated TP sizes (default: 1,2,4 on GPUs, 1,2 on a CPU)")
    parser.add_argument("--num-requests", type=int, default=None, help="default: 256 on GPUs, 16 on a CPU")
    parser.add_argument("--min-len", type=int, default=None, help="default: 100 on GPUs, 8 on a CPU")
    parser.add_argument("--max-len", type=int, default=None, help="default: 1024 on GPUs, 48 on a CPU")
    parser.add_argument("--latency-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 on GPUs, 16 on a CPU")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs at TP=1 either (TP > 1 runs "
                                                                      "eager): the same execution for every size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    config = args.config or ("qwen3-8b" if gpu else "tiny")
    sizes = [int(t) for t in (args.tp or ("1,2,4" if gpu else "1,2")).split(",")]
    if gpu and max(sizes) > torch.cuda.device_count():
        raise SystemExit(f"--tp {max(sizes)} needs {max(sizes)} GPUs; PyTorch sees {torch.cuda.device_count()}")
    args.num_requests = args.num_requests or (256 if gpu else 16)
    args.min_len, args.max_len = args.min_len or (100 if gpu else 8), args.max_len or (1024 if gpu else 48)
    args.max_num_seqs = args.max_num_seqs or (256 if gpu else 16)
    rng = random.Random(args.seed)
    vocab = MODELS[config].vocab_size if config in MODELS else 49152
    lens = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_requests)]
    outs = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_requests)]
    prompts = [random_ids(rng, n, vocab) for n in lens]
    latency_prompt = random_ids(rng, 32, vocab)
    runs = {}
    for tp in sizes:
        print(f"TP={tp}: building ...", flush=True)
        with build(config, device, tp, args) as llm:
            runs[tp] = measure(llm, prompts, outs, [latency_prompt], args, device)
        free_memory()
        print(f"TP={tp}: {runs[tp]}", flush=True)
    if 1 in runs:
        for tp, r in runs.items():
            r["speedup_vs_tp1"] = round(r["output_tokens_per_s"] / runs[1]["output_tokens_per_s"], 3)
            r["scaling_efficiency"] = round(r["speedup_vs_tp1"] / tp, 3)
    data = {"device": device.type, "config": config, "cpu_count": os.cpu_count(),
            "cuda_graphs": "TP=1 only" if gpu and not args.enforce_eager else "none",
            "workload": {"num_requests": args.num_requests, "len_range": [args.min_len, args.max_len],
                         "latency_tokens": args.latency_tokens, "max_num_seqs": args.max_num_seqs, "seed": args.seed},
            "runs": {str(tp): r for tp, r in runs.items()}}
    path = save(f"18_tensor_parallel_{device.type}_{config}", data, args.out)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
