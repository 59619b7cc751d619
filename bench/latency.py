"""Phase 12: latency of one request: decode time per token at batch 1, and time to first token (TTFT).

    python -m bench.latency                           # GPU if there is one; saves 12_latency_<device>.json
    python -m bench.latency --device cuda             # Qwen3-0.6B shapes, random bf16 weights
    python -m bench.latency --config tiny --out /tmp  # a dry run on a tiny model (any device)

Two measurements, each the median of ``--repeats`` runs after a warm-up run, each run on fresh random
token ids (and prefix caching off, so nothing is served from the cache):

* **decode**: a ``--prompt-len``-token prompt and ``--output-len`` output tokens (EOS ignored); the time
  per output token *after the first* (``(last token time - first token time) / (tokens - 1)``), which
  leaves the prefill out;
* each mode's greedy tokens for its warm-up decode prompt (the same prompt in every mode) are compared with the
  default engine's: ``same_leading_tokens_as_cuda_graphs`` (an end-to-end check that a switched kernel computes the
  same model; bf16 roundings may part them late in a run);
* **TTFT**: a ``--ttft-len``-token prompt (1k by default), one output token; from ``add_request`` to the
  token (tokenization is not included: the prompt is token ids).

On a GPU both run in ten engines: the default (a CUDA graph per decode batch size, piecewise graphs for
prefill steps), decode graphs only (``cuda_graph_max_tokens=0``: prefill steps launched op by op),
``enforce_eager=True``, the default with the overlapped loop -- to show what each kind of graph saves -- and the
default with the linear layers of small steps switched between ``kernels.gemv`` and cuBLAS
(``kernels.gemv.ENGINE_MAX_TOKENS``: "cuda_graphs_cublas" sets 0), and the default with the norms and SiLU·mul
left as separate kernels ("cuda_graphs_unfused": ``kernels.gemv.ENGINE_SILU_PROLOGUE`` off), and the default
with the L2 prefetch of each layer's later weights switched (``kernels.gemv.ENGINE_L2_PREFETCH``; off by default:
"cuda_graphs_l2_prefetch" turns it on), and the default with programmatic dependent launch off ("cuda_graphs_no_pdl":
``kernels._launch.PDL``; it is on by default where the GPU has it, sm_90 and newer), and the default with each decode
layer's QK-norm, RoPE and KV store done inside the attention kernel switched ("cuda_graphs_decode_prep":
``kernels.paged_decode_prep.ENGINE``), and that kernel with its reads moved before the wait for the previous kernel
("cuda_graphs_decode_prep_early": ``EARLY`` too), and the default with each sequence cutting its own context into
a decode graph's split-K grid switched ("cuda_graphs_dynamic_split", or "cuda_graphs_static_split" where the default
cuts them: ``kernels.paged_attention_warp.DYNAMIC_SPLIT``, by default on for limits of ``DYNAMIC_SPLIT_MIN_KEYS`` keys
or more; it matters under a long ``--max-model-len``). On a CPU there are no graphs: the eager engine only. ``--modes``
runs a subset (the derived speedups need all of them; the decode-prep ones only their mode and "cuda_graphs").
``--max-model-len`` sets the engine's limit as a server's would be (the model's, 40,960 for Qwen3; by default the
longest run + a block): a decode graph sizes its split-K grid by it (``kernels.paged_attention_warp.split_size``).
Left out: latency under load (bench.throughput measures the batch; the server's phase measures online).
"""

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see bench/throughput.py

import torch  # noqa: E402

from bench._harness import engine_parser, save_tagged  # noqa: E402
from bench._harness import engine_config, free_memory, model_spec, random_ids, resolve_device  # noqa: E402
from minivllm.utils import cdiv  # noqa: E402

TARGETS = {"cuda": {"decode_ms_per_token": 0.6, "ttft_1k_ms": 15.0}}  # issue 17


def measure(llm, args: argparse.Namespace, rng: random.Random) -> dict:
    from minivllm.sampling_params import SamplingParams

    engine = llm.engine
    vocab = engine.model.config.vocab_size

    def one(prompt_len: int, max_tokens: int):
        rid = engine.add_request(random_ids(rng, prompt_len, vocab),
                                 SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        while True:
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    assert len(out.outputs[0].token_ids) == max_tokens
                    return out.metrics, list(out.outputs[0].token_ids)

    decode, ttft, tokens = [], [], None
    for i in range(args.repeats + 1):  # run 0 is the warm-up
        m, ids = one(args.prompt_len, args.output_len)
        tokens = tokens or ids  # the warm-up's greedy tokens: the same prompt in every mode (rng seeded alike)
        if i:
            decode.append((m.last_token_time - m.first_token_time) / (args.output_len - 1) * 1e3)
        m, _ = one(args.ttft_len, 1)
        if i:
            ttft.append(m.time_to_first_token * 1e3)
    engine.check_no_leaks()
    return {"decode_ms_per_token": round(statistics.median(decode), 4),
            "decode_tokens_per_s": round(1e3 / statistics.median(decode), 1),
            "ttft_ms": round(statistics.median(ttft), 3),
            "runs": {"decode_ms_per_token": [round(x, 4) for x in decode], "ttft_ms": [round(x, 3) for x in ttft]},
            "tokens": tokens}


def run(args: argparse.Namespace) -> dict:
    from minivllm.llm import LLM

    device = resolve_device(args.device)
    name, mc = model_spec(args.config, device)
    block_size = 16
    longest = max(args.prompt_len + args.output_len, args.ttft_len + 1)
    if args.max_model_len is not None and args.max_model_len < longest:
        raise SystemExit(f"--max-model-len {args.max_model_len}: the runs need {longest} tokens")
    options = dict(max_model_len=args.max_model_len or longest + block_size, max_num_seqs=args.max_num_seqs,
                   max_num_batched_tokens=max(2048, args.ttft_len), enable_prefix_caching=False,
                   num_kv_blocks=4 * cdiv(longest, block_size), block_size=block_size,
                   cuda_graph_max_batch=args.max_num_seqs)
    result: dict = {"device": device.type, "config": name, "dtype": "bfloat16" if device.type == "cuda" else "float32",
                    "threads": torch.get_num_threads(), "prompt_len": args.prompt_len, "output_len": args.output_len,
                    "ttft_prompt_len": args.ttft_len, "repeats": args.repeats, "engine": options}
    # each mode's engine options; on a GPU also graphs with the other loop (overlapped or plain) than the default's
    import kernels.gemv

    switched = ("ENGINE_MAX_TOKENS", "ENGINE_SILU_PROLOGUE", "ENGINE_L2_PREFETCH")  # kernels.gemv's switches
    defaults = {k: getattr(kernels.gemv, k) for k in switched}
    default_gemv, default_silu = defaults["ENGINE_MAX_TOKENS"], defaults["ENGINE_SILU_PROLOGUE"]
    other = "cuda_graphs_cublas" if default_gemv else "cuda_graphs_gemv"  # the default's linear layers, switched
    prefetch = "cuda_graphs_no_prefetch" if defaults["ENGINE_L2_PREFETCH"] else "cuda_graphs_l2_prefetch"  # switched
    from minivllm.config import EngineConfig

    import kernels.paged_decode_prep

    default_prep, default_early = kernels.paged_decode_prep.ENGINE, kernels.paged_decode_prep.EARLY
    prep = "cuda_graphs_no_decode_prep" if default_prep else "cuda_graphs_decode_prep"  # switched
    import kernels.paged_attention_warp

    switch = kernels.paged_attention_warp.DYNAMIC_SPLIT  # None: a rule on the graphs' key limit (max_model_len)
    default_dynamic = (options["max_model_len"] >= kernels.paged_attention_warp.DYNAMIC_SPLIT_MIN_KEYS
                       if switch is None else switch)  # what the default does in this run
    dynamic = "cuda_graphs_static_split" if default_dynamic else "cuda_graphs_dynamic_split"  # switched
    default_async = EngineConfig.from_kwargs(**engine_config(name, mc, device, **options)).overlaps
    loop = "cuda_graphs_no_async" if default_async else "cuda_graphs_async"  # the default's loop, switched
    modes = ({"cuda_graphs": {}, "decode_graphs_only": {"cuda_graph_max_tokens": 0}, "eager": {"enforce_eager": True},
              loop: {"async_scheduling": not default_async}, other: {}, "cuda_graphs_unfused": {}, prefetch: {},
              "cuda_graphs_no_pdl": {}, prep: {}, "cuda_graphs_decode_prep_early": {}, dynamic: {}}
             if device.type == "cuda" else {"eager": {"enforce_eager": True}})
    if args.modes:
        unknown = sorted(set(args.modes) - set(modes))
        if unknown:
            raise SystemExit(f"--modes: no mode {unknown} on {device.type}; modes: {', '.join(modes)}")
        modes = {m: o for m, o in modes.items() if m in args.modes}
    import kernels._launch

    default_pdl = kernels._launch.PDL
    switches = {"cuda_graphs_gemv": {"ENGINE_MAX_TOKENS": 8}, "cuda_graphs_cublas": {"ENGINE_MAX_TOKENS": 0},
                "cuda_graphs_unfused": {"ENGINE_MAX_TOKENS": default_gemv or 2, "ENGINE_SILU_PROLOGUE": False},
                "cuda_graphs_no_prefetch": {"ENGINE_L2_PREFETCH": False},
                "cuda_graphs_l2_prefetch": {"ENGINE_L2_PREFETCH": True}}  # per mode, set before graph capture
    for mode, mode_options in modes.items():
        for k, v in {**defaults, **switches.get(mode, {})}.items():
            setattr(kernels.gemv, k, v)
        kernels._launch.PDL = default_pdl and mode != "cuda_graphs_no_pdl"
        kernels.paged_decode_prep.ENGINE = default_prep != (mode == prep) or mode == "cuda_graphs_decode_prep_early"
        kernels.paged_decode_prep.EARLY = default_early or mode == "cuda_graphs_decode_prep_early"
        kernels.paged_attention_warp.DYNAMIC_SPLIT = (not default_dynamic) if mode == dynamic else switch
        try:
            start = time.perf_counter()
            llm = LLM(**engine_config(name, mc, device, seed=args.seed, **options, **mode_options))
            setup = time.perf_counter() - start
            result[mode] = {"setup_s": round(setup, 2), **measure(llm, args, random.Random(args.seed))}
        finally:
            for k, v in defaults.items():
                setattr(kernels.gemv, k, v)
            kernels._launch.PDL = default_pdl
            kernels.paged_decode_prep.ENGINE, kernels.paged_decode_prep.EARLY = default_prep, default_early
            kernels.paged_attention_warp.DYNAMIC_SPLIT = switch
        del llm
        free_memory()
    if all(m in result for m in ("cuda_graphs", "eager", "decode_graphs_only", "cuda_graphs_unfused", loop, prefetch,
                                 "cuda_graphs_no_pdl", other)):
        result["graph_speedup_decode"] = round(result["eager"]["decode_ms_per_token"]
                                               / result["cuda_graphs"]["decode_ms_per_token"], 2)
        result["piecewise_speedup_ttft"] = round(result["decode_graphs_only"]["ttft_ms"]
                                                 / result["cuda_graphs"]["ttft_ms"], 2)
        gemv, cublas = (("cuda_graphs_gemv", "cuda_graphs") if "cuda_graphs_gemv" in result
                        else ("cuda_graphs", "cuda_graphs_cublas"))
        result["gemv_speedup_decode"] = round(result[cublas]["decode_ms_per_token"]
                                              / result[gemv]["decode_ms_per_token"], 3)
        result["engine_gemv_max_tokens"] = default_gemv
        result["engine_gemv_prologues"] = default_silu
        result["prologue_speedup_decode"] = round(result["cuda_graphs_unfused"]["decode_ms_per_token"]
                                                  / result["cuda_graphs"]["decode_ms_per_token"], 3)
        result["engine_async_scheduling"] = default_async
        on, off = (("cuda_graphs", loop) if default_async else (loop, "cuda_graphs"))
        result["async_speedup_decode"] = round(result[off]["decode_ms_per_token"]
                                               / result[on]["decode_ms_per_token"], 3)
        result["engine_l2_prefetch"] = defaults["ENGINE_L2_PREFETCH"]
        on, off = (("cuda_graphs", prefetch) if defaults["ENGINE_L2_PREFETCH"] else (prefetch, "cuda_graphs"))
        result["l2_prefetch_speedup_decode"] = round(result[off]["decode_ms_per_token"]
                                                     / result[on]["decode_ms_per_token"], 3)
        result["engine_pdl"] = default_pdl and kernels._launch.pdl_active()
        result["pdl_speedup_decode"] = round(result["cuda_graphs_no_pdl"]["decode_ms_per_token"]
                                             / result["cuda_graphs"]["decode_ms_per_token"], 3)
    base = result.get("cuda_graphs", {}).get("tokens")  # greedy tokens of the same prompt in every mode
    for mode in modes:
        tokens = result[mode].pop("tokens") if mode in result else None
        if tokens is not None and base is not None and mode != "cuda_graphs":  # how many lead equal to the default's
            same = next((i for i, (x, y) in enumerate(zip(tokens, base)) if x != y), len(tokens))
            result[mode]["same_leading_tokens_as_cuda_graphs"] = same
    if "cuda_graphs" in result and prep in result:  # its own pair: --modes cuda_graphs <prep mode> suffices
        result["engine_decode_prep"] = default_prep
        on, off = (("cuda_graphs", prep) if default_prep else (prep, "cuda_graphs"))
        result["decode_prep_speedup_decode"] = round(result[off]["decode_ms_per_token"]
                                                     / result[on]["decode_ms_per_token"], 3)
    if "cuda_graphs" in result and dynamic in result:  # its own pair too; it matters under a long --max-model-len
        result["engine_dynamic_split"] = default_dynamic
        on, off = (("cuda_graphs", dynamic) if default_dynamic else (dynamic, "cuda_graphs"))
        result["dynamic_split_speedup_decode"] = round(result[off]["decode_ms_per_token"]
                                                       / result[on]["decode_ms_per_token"], 3)
    if "cuda_graphs" in result and "cuda_graphs_decode_prep_early" in result:
        base, early = result["cuda_graphs"], result["cuda_graphs_decode_prep_early"]
        result["decode_prep_early_speedup_decode"] = round(base["decode_ms_per_token"]
                                                           / early["decode_ms_per_token"], 3)
    result["targets"] = TARGETS.get(device.type) if name == "qwen3-0.6b" else None
    return result


def parser() -> argparse.ArgumentParser:
    p = engine_parser("Batch-1 decode ms/token and time to first token, graphs vs eager")
    p.add_argument("--prompt-len", type=int, default=16, help="decode run: prompt tokens")
    p.add_argument("--output-len", type=int, default=256, help="decode run: output tokens")
    p.add_argument("--ttft-len", type=int, default=1024, help="TTFT run: prompt tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="the engine's limit (default: the longest run + a block); a server's is the model's, 40,960 "
                        "for Qwen3: decode graphs size their split-K grid by it")
    p.add_argument("--max-num-seqs", type=int, default=8, help="also the largest captured graph")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="run only these modes (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    data = run(args)
    for mode in ("cuda_graphs", "decode_graphs_only", "eager", "cuda_graphs_async", "cuda_graphs_no_async",
                 "cuda_graphs_gemv", "cuda_graphs_cublas", "cuda_graphs_unfused", "cuda_graphs_no_prefetch",
                 "cuda_graphs_l2_prefetch", "cuda_graphs_no_pdl", "cuda_graphs_decode_prep",
                 "cuda_graphs_no_decode_prep", "cuda_graphs_decode_prep_early", "cuda_graphs_dynamic_split",
                 "cuda_graphs_static_split"):
        if mode in data:
            r = data[mode]
            same = r.get("same_leading_tokens_as_cuda_graphs")
            print(f"{data['config']} on {data['device']}, {mode:18s}: decode {r['decode_ms_per_token']:.3f} ms/token "
                  f"({r['decode_tokens_per_s']:,.0f} tok/s), TTFT({data['ttft_prompt_len']}) {r['ttft_ms']:.1f} ms"
                  + ("" if same is None else f", first {same} of {data['output_len']} greedy tokens as cuda_graphs"))
    if "decode_prep_speedup_decode" in data:
        print(f"attention preparing its own inputs (kernels.paged_decode_prep): {data['decode_prep_speedup_decode']}x "
              "decode")
    if "dynamic_split_speedup_decode" in data:
        print(f"each sequence's own split-K chunks (kernels.paged_attention_warp.DYNAMIC_SPLIT): "
              f"{data['dynamic_split_speedup_decode']}x decode")
    if "graph_speedup_decode" in data:
        print(f"CUDA graphs: {data['graph_speedup_decode']}x faster decode")
    print(f"saved {save_tagged('12_latency', data, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
