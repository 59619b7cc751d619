"""Phase 12: prefix caching on a shared system prompt: prefill tokens computed and TTFT, cache on vs off.

    python -m bench.prefix                            # GPU if there is one; saves 12_prefix_<device>.json
    python -m bench.prefix --device cuda              # 64 requests, a 2,048-token shared prompt, Qwen3-0.6B shapes
    python -m bench.prefix --device cpu               # 8 requests, a 256-token shared prompt, the default model
    python -m bench.prefix --config tiny --out /tmp   # a dry run on a tiny model (any device)

Every request is the same ``--shared-len`` random tokens (the "system prompt") followed by its own
``--suffix-len`` random tokens, and generates ``--max-tokens`` tokens (EOS ignored, greedy). For each
setting a fresh engine first serves one request with the shared prompt (as a server would have done
before: this scheduler publishes a sequence's blocks to the radix cache when it finishes), then all
``--num-requests`` arrive at once. Reported per setting: prefill tokens computed, prompt tokens served
from the cache, TTFT (median and max over the requests, queueing included: they all arrive together),
total time; and the outputs must agree between the two settings (greedy: a cache hit changes no token,
up to float rounding on a GPU).
"""

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see bench/throughput.py

import torch  # noqa: E402

from bench._harness import engine_parser, save_tagged  # noqa: E402
from bench._harness import (  # noqa: E402
    engine_config, free_memory, model_spec, random_ids, resolve_device, same_tokens, sync)
from minivllm.utils import cdiv  # noqa: E402

TARGETS = {"prefill_tokens_saved": 0.9}


def run_setting(name: str, mc, device: torch.device, caching: bool, args: argparse.Namespace) -> tuple[dict, list]:
    from minivllm.llm import LLM
    from minivllm.sampling_params import SamplingParams

    rng = random.Random(args.seed)  # the same prompts for both settings
    block_size = 16
    per_request = args.shared_len + args.suffix_len + args.max_tokens
    llm = LLM(**engine_config(name, mc, device, seed=args.seed, enable_prefix_caching=caching, block_size=block_size,
                              max_model_len=per_request + block_size, max_num_seqs=args.num_requests + 1,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              num_kv_blocks=(args.num_requests + 2) * cdiv(per_request, block_size) + 8))
    engine = llm.engine
    vocab = engine.model.config.vocab_size
    shared = random_ids(rng, args.shared_len, vocab)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([shared + random_ids(rng, args.suffix_len, vocab)], params, use_tqdm=False)  # warms the cache
    prompts = [shared + random_ids(rng, args.suffix_len, vocab) for _ in range(args.num_requests)]
    before = dict(engine.stats)
    sync(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - start
    ttft = [o.metrics.time_to_first_token * 1e3 for o in outs]
    engine.check_no_leaks()
    result = {
        "prefill_tokens_computed": engine.stats["prefill_tokens_computed"] - before["prefill_tokens_computed"],
        "cached_prompt_tokens": engine.stats["cached_prompt_tokens"] - before["cached_prompt_tokens"],
        "ttft_ms_median": round(statistics.median(ttft), 2),
        "ttft_ms_max": round(max(ttft), 2),
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(sum(len(o.outputs[0].token_ids) for o in outs) / seconds, 1),
    }
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm, engine
    free_memory()
    return result, tokens


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    name, mc = model_spec(args.config, device)
    result: dict = {"device": device.type, "config": name, "dtype": "bfloat16" if device.type == "cuda" else "float32",
                    "threads": torch.get_num_threads(), "num_requests": args.num_requests,
                    "shared_len": args.shared_len, "suffix_len": args.suffix_len, "max_tokens": args.max_tokens,
                    "prompt_tokens": args.num_requests * (args.shared_len + args.suffix_len)}
    tokens = {}
    for key, caching in (("cache_off", False), ("cache_on", True)):
        result[key], tokens[key] = run_setting(name, mc, device, caching, args)
    off, on = result["cache_off"], result["cache_on"]
    result["prefill_tokens_saved"] = round(1 - on["prefill_tokens_computed"] / off["prefill_tokens_computed"], 4)
    result["ttft_speedup_median"] = round(off["ttft_ms_median"] / on["ttft_ms_median"], 2)
    result["same_outputs"] = same_tokens(tokens["cache_off"], tokens["cache_on"])
    result["targets"] = TARGETS if name != "tiny" else None
    return result


def parser() -> argparse.ArgumentParser:
    p = engine_parser("Prefix caching: a shared system prompt, cache on vs off")
    p.add_argument("--num-requests", type=int, default=None, help="GPU 64, CPU 8")
    p.add_argument("--shared-len", type=int, default=None, help="shared prompt tokens: GPU 2048, CPU 256")
    p.add_argument("--suffix-len", type=int, default=None, help="each request's own tokens: GPU 32, CPU 16")
    p.add_argument("--max-tokens", type=int, default=None, help="GPU 32, CPU 8")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="GPU 8192, CPU 2048")
    return p


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    device = resolve_device(args.device)
    name, _ = model_spec(args.config, device)
    gpu, tiny = device.type == "cuda", args.config == "tiny"
    defaults = {"num_requests": 6 if tiny else 64 if gpu else 8, "shared_len": 64 if tiny else 2048 if gpu else 256,
                "suffix_len": 8 if tiny else 32 if gpu else 16, "max_tokens": 4 if tiny else 32 if gpu else 8,
                "max_num_batched_tokens": 8192 if gpu else 2048}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = fill_defaults(parser().parse_args(argv))
    data = run(args)
    print(f"{data['config']} on {data['device']}: {data['num_requests']} requests, {data['shared_len']}-token shared "
          f"prompt + {data['suffix_len']} own tokens, {data['max_tokens']} output tokens each")
    for key in ("cache_off", "cache_on"):
        r = data[key]
        print(f"{key:9s}: {r['prefill_tokens_computed']:7,} prefill tokens computed, {r['cached_prompt_tokens']:7,} "
              f"from the cache, TTFT median {r['ttft_ms_median']:8.1f} ms (max {r['ttft_ms_max']:.1f}), "
              f"{r['seconds']} s")
    print(f"prefill tokens saved: {data['prefill_tokens_saved']:.1%}, TTFT {data['ttft_speedup_median']}x; "
          f"same outputs: {data['same_outputs']}/{data['num_requests']}")
    print(f"saved {save_tagged('12_prefix', data, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
