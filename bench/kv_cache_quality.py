"""What an fp8 (e4m3) KV cache does to answers: the same greedy chats with the model's own cache and with an fp8
one, back to back, on the default model (the exact fp32 path on a CPU, bf16 on a GPU).

    python -m bench.kv_cache_quality [--requests 32] [--max-tokens 64] [--out DIR]
                                                       # writes 17_kv_fp8_quality_<device>.json

Greedy decoding makes every difference visible: an answer is either identical, or it parts from the exact one
at some token, after which the two are different continuations (both may be fine answers; only the exact one is
the model's own). Reported: how many answers are identical, where the others part, and, at every position where
both runs chose the same token so far, how far apart the two log-probabilities of that token are (the cache's
rounding seen in the model's own confidence). For scale, a third run keeps the exact cache but rounds each K and V
to bf16 before storing it (7 mantissa bits instead of e4m3's 3): how sensitive greedy answers are to any rounding.
"""

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from bench._harness import RESULTS, resolve_device, save
from bench.throughput import QUESTIONS


def _chosen_logprobs(output) -> list[float]:
    """The log-probability of each sampled token (``SamplingParams(logprobs=0)``: just that one)."""
    out = []
    for step, token in zip(output.logprobs, output.token_ids):
        value = step[token]
        out.append(float(getattr(value, "logprob", value)))
    return out


@contextlib.contextmanager
def _rounded_store(dtype: torch.dtype | None):
    """While inside: every K and V the engine stores is first rounded to ``dtype`` (and back); None: as it is."""
    from minivllm.model import paged_attention as pa

    store = pa.store
    if dtype is not None:
        pa.store = lambda k, v, layer, meta: store(k.to(dtype).to(k.dtype), v.to(dtype).to(v.dtype), layer, meta)
    try:
        yield
    finally:
        pa.store = store


def run(args: argparse.Namespace) -> dict:
    from minivllm import LLM, SamplingParams

    device = resolve_device(args.device)
    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=0)
    runs = {}
    names = [("auto", "auto"), ("fp8", "fp8")] + ([("bf16_rounded", "auto")] if device.type == "cpu" else [])
    for name, kv_cache_dtype in names:  # NOTE: on a GPU the fused kernel stores K/V itself: no rounded run there
        start = time.perf_counter()
        llm = LLM(device=device.type, kv_cache_dtype=kv_cache_dtype, max_num_seqs=args.requests,
                  **({"dtype": "float32"} if device.type == "cpu" else {}))
        with _rounded_store(torch.bfloat16 if name == "bf16_rounded" else None):
            outs = [o.outputs[0] for o in llm.chat(convs, params, use_tqdm=False)]
        runs[name] = {"tokens": [o.token_ids for o in outs], "logprobs": [_chosen_logprobs(o) for o in outs],
                      "cache": repr(llm.engine.kv_cache), "seconds": round(time.perf_counter() - start, 2)}
        del llm
    exact, fp8 = runs["auto"], runs["fp8"]
    parts, deltas = [], []
    for a, b, la, lb in zip(exact["tokens"], fp8["tokens"], exact["logprobs"], fp8["logprobs"]):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        parts.append(None if a == b else same)
        deltas += [abs(x - y) for x, y in zip(la[:same], lb[:same])]
    differing = [p for p in parts if p is not None]
    return {"device": device.type, "model": "default (SmolLM2-135M-Instruct)",
            "dtype": "float32" if device.type == "cpu" else "bfloat16", "requests": args.requests,
            "max_tokens": args.max_tokens, "caches": {k: v["cache"] for k, v in runs.items()},
            "identical_answers": len(parts) - len(differing),
            "identical_answers_bf16_rounded_cache": sum(a == b for a, b in zip(exact["tokens"],
                                                                             runs["bf16_rounded"]["tokens"]))
            if "bf16_rounded" in runs else None,
            "first_differing_token": {"each": parts, "median": statistics.median(differing) if differing else None,
                                      "min": min(differing) if differing else None},
            "tokens_before_parting": sum(p if p is not None else len(a) for p, a in zip(parts, exact["tokens"])),
            "exact_tokens": sum(map(len, exact["tokens"])),
            "chosen_logprob_abs_diff": {"positions": len(deltas),
                                        "mean": round(statistics.fmean(deltas), 5) if deltas else None,
                                        "max": round(max(deltas), 5) if deltas else None},
            "seconds": {k: v["seconds"] for k, v in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = run(args)
    f = data["first_differing_token"]
    print(f"{data['identical_answers']}/{data['requests']} answers identical with an fp8 cache; the others part at "
          f"token {f['min']}..(median {f['median']}); {data['tokens_before_parting']:,} of {data['exact_tokens']:,} "
          f"tokens before parting; |d logprob| of the chosen token: mean {data['chosen_logprob_abs_diff']['mean']}, "
          f"max {data['chosen_logprob_abs_diff']['max']}; with K/V only rounded to bf16: "
          f"{data['identical_answers_bf16_rounded_cache']}/{data['requests']} identical")
    name = "17_kv_fp8_quality_" + data["device"]
    print(f"saved {save(name, data, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
