"""Phase 13: the server under load: N concurrent streaming clients, throughput and latency as they see it.

    python -m bench.serve                                    # CPU: the embedded SmolLM2, 1/4/16/64 clients
    python -m bench.serve --device cuda --config qwen3-0.6b --concurrency 1 4 16 64 256 --max-tokens 256
    python -m bench.serve --model ~/models/Qwen3-0.6B --device cuda
    python -m bench.serve --config tiny --concurrency 1 4 --out /tmp      # a dry run

The server (``build_app`` + uvicorn on a loopback port) runs in this process, in threads; the clients are
``httpx`` streams on an asyncio loop in the main thread. At each concurrency level N, N clients each send
``--requests-per-client`` streaming completions one after another (chat-like prompts; EOS ignored so
every answer is ``--max-tokens`` long). Per request: time to first token (request sent -> first chunk
with a token), inter-token latency (gaps between token chunks, split evenly over the tokens a chunk
carries). Per level: output tokens/s over the level's wall time, and p50/p99 of TTFT and ITL. A random
model (``--config``) has no tokenizer: its prompts are token ids and it streams one chunk per token
through ``logprobs: 0``. Saved as ``bench/results/13_serve_<device>.json``.

Left out: open-loop (Poisson) arrivals, which vLLM's ``benchmark_serving`` adds; a separate client process
(on a 2-core CPU the clients' own work is part of what is measured).
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import torch

from bench._harness import engine_parser, save_tagged
from bench.models import RANDOM_MODELS

TOPICS = ["the sea", "a lighthouse", "autumn leaves", "a robot", "the moon", "bread", "a train", "chess",
          "a garden", "rain", "a violin", "mountains", "a lost key", "coffee", "a city at night", "owls"]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks; nan for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


async def one_request(http, url: str, body: dict) -> dict:
    """Send one streaming completion; returns its TTFT, token gaps and token count."""
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                n = len(choice["logprobs"]["tokens"]) if choice.get("logprobs") else (1 if choice["text"] else 0)
                if not n:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps += [(now - last) / n] * n
                last = now
    return {"ttft": first - start, "gaps": gaps, "tokens": tokens}


async def run_level(url: str, model: str, prompts: list, concurrency: int, per_client: int, max_tokens: int,
                    token_ids: bool) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(c: int) -> list[dict]:
            results = []
            for i in range(per_client):
                body = {"model": model, "prompt": prompts[(c * per_client + i) % len(prompts)], "stream": True,
                        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                        "stream_options": {"include_usage": True}}
                if token_ids:
                    body["logprobs"] = 0
                results.append(await one_request(http, url, body))
            return results

        start = time.perf_counter()
        per = await asyncio.gather(*(client(c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    reqs = [r for rs in per for r in rs]
    ttft = [r["ttft"] * 1e3 for r in reqs]
    itl = [g * 1e3 for r in reqs for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in reqs)
    return {"concurrency": concurrency, "requests": len(reqs), "wall_s": round(wall, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(reqs) / wall, 3),
            "ttft_ms": {"p50": round(percentile(ttft, 50), 2), "p99": round(percentile(ttft, 99), 2),
                        "mean": round(statistics.fmean(ttft), 2)},
            "itl_ms": {"p50": round(percentile(itl, 50), 3), "p99": round(percentile(itl, 99), 3),
                       "mean": round(statistics.fmean(itl), 3) if itl else float("nan")}}


def run(args: argparse.Namespace) -> dict:
    from minivllm.engine import LLMEngine
    from minivllm.server import ServerThread, build_app

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    name = args.config or ("qwen3-0.6b" if device == "cuda" and args.model is None else "default")
    model = RANDOM_MODELS.get(name) if args.model is None else args.model
    engine = LLMEngine(model=model, device=device, max_num_seqs=max(args.concurrency),
                       max_num_batched_tokens=None if device == "cpu" else max(2048, max(args.concurrency)),
                       max_model_len=args.max_model_len)
    rng = random.Random(args.seed)
    token_ids = engine.tokenizer is None
    if token_ids:
        prompts = [[rng.randrange(engine.model.config.vocab_size) for _ in range(args.prompt_len)] for _ in range(64)]
    else:
        prompts = [f"Write a short story about {t}." for t in TOPICS]
    prompt_tokens = [len(p) if token_ids else len(engine.tokenizer.encode(p, add_special_tokens=True)) for p in prompts]
    app = build_app(engine, model_name="bench")
    levels, load_before = [], os.getloadavg()[0]
    with ServerThread(app) as server:
        asyncio.run(run_level(server.url, "bench", prompts, 1, 1, 4, token_ids))  # warm-up
        for c in args.concurrency:
            level = asyncio.run(run_level(server.url, "bench", prompts, c, args.requests_per_client,
                                          args.max_tokens, token_ids))
            levels.append(level)
            print(f"{c:4d} clients: {level['output_tokens_per_s']:9.1f} output tok/s, TTFT p50 "
                  f"{level['ttft_ms']['p50']:8.1f} ms p99 {level['ttft_ms']['p99']:8.1f} ms, ITL p50 "
                  f"{level['itl_ms']['p50']:7.1f} ms p99 {level['itl_ms']['p99']:7.1f} ms", flush=True)
    engine.check_no_leaks()
    return {"config": name if args.model is None else str(args.model), "device": device,
            "dtype": str(engine.dtype).removeprefix("torch."), "max_tokens": args.max_tokens,
            "requests_per_client": args.requests_per_client, "prompt_tokens_mean": statistics.fmean(prompt_tokens),
            "load_average_1min": [load_before, os.getloadavg()[0]],  # other processes on the machine, start / end
            "levels": levels}


def parser() -> argparse.ArgumentParser:
    p = engine_parser("Concurrent streaming clients against the server: throughput, TTFT, ITL")
    p.add_argument("--model", default=None, help="a checkpoint directory or .gguf (instead of --config)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (EOS ignored)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of a random model's prompts")
    p.add_argument("--max-model-len", type=int, default=2048)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    data = run(args)
    print(f"saved {save_tagged('13_serve', data, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
