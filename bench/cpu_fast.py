"""Issue 14 on the CPU: the default model's fast path next to fp32, ``transformers`` and (if installed) llama.cpp.

    python -m bench.cpu_fast                       # everything; saves bench/results/14_cpu_fast.json
    python -m bench.cpu_fast --only quality batch1 --out /tmp

One process, one machine load, the same GGUF (the embedded SmolLM2-135M-Instruct, Q4_1) for every peer. The
fast path is the CPU default, ``quantization="q4"`` (the GGUF's Q4_1 / Q8_0 blocks through numba kernels for
up to ``BlockLinear.max_rows`` rows, fbgemm fp16 beyond) with its decode steps on the model's
``block_decoder`` (:mod:`minivllm.model.q4_decode`); ``minivllm_q4`` is the same linears on the module path
(:func:`decoder_hook` with ``on=False``), and ``"fp16"`` (fbgemm fp16 linears for every row count) is measured
beside them.

* ``quality``: teacher-forced over a fixed English text (the first ``--quality-tokens`` tokens of CPython's
  LICENSE.txt): top-1 agreement of each fast path with exact fp32, and each one's perplexity. The text is one
  forward pass of many rows, so for ``q4`` the block kernels are forced on every row (``max_rows`` raised):
  the numbers are the kernels' own;
* ``rows``: the 30 layers' linears of the default model (its real block weights) for 1..8 rows, block kernels
  against fbgemm fp16 in the same loop: where ``BlockLinear.max_rows`` should switch;
* ``batch1``: one chat prompt, ``--max-tokens`` greedy tokens (EOS ignored), decode tokens/s after the
  first token; minivllm q4 and fp16, minivllm fp32, ``transformers`` batch 1, llama.cpp batch 1 (``llama_cpp``
  importable only). Runs alternate and the best of ``--repeats`` counts (load from other processes disturbs
  single runs); a thread sweep (1 vs 2, torch and numba together) of the fast path;
* ``breakdown``: where a batch-1 decode step's time goes (linears, attention, norms, RoPE, SiLU, model glue,
  runner, sampler, engine), q4 and fp16, by timers around the parts (each part's own time, nested parts
  excluded);
* ``chats32``: 32 chat prompts at once (``max_tokens`` 64..128) through ``LLM.generate``, fast path: aggregate
  output tokens/s against ``transformers``' and llama.cpp's batch-1 decode rates from ``batch1``;
* ``server``: the OpenAI server on the fast engine with 1 / 8 / 32 streaming clients (``bench.serve``'s client);
* ``long_prompt``: 8 chats decoding while a ~4k-token prompt arrives: the longest gap between two tokens of
  a decoding stream, with the CPU token budget (``minivllm.config.default_max_num_batched_tokens``) and with 2048.

Every section records the 1-minute load average before and after.
"""

import argparse
import asyncio
import collections
import contextlib
import inspect
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see bench/throughput.py

import torch  # noqa: E402

from bench._harness import RESULTS, save  # noqa: E402

SECTIONS = ("quality", "rows", "batch1", "breakdown", "chats32", "server", "long_prompt")
FAST = "q4"  # the CPU default (EngineConfig.quantization_method); "fp16" is measured beside it
TARGETS = {"batch1_vs_llama_cpp": 1.0, "batch1_vs_transformers": 6.0, "chats32_vs_transformers": 25.0,
           "server_one_client_tokens_per_s": 40.0, "long_prompt_max_gap_s": 1.0,
           "quality_top1_agreement": 0.95, "quality_perplexity_ratio_max": 1.03}
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def load() -> float:
    return round(os.getloadavg()[0], 2)


def fast_llm(quantization: str = FAST, **options):
    """``LLM`` on the CPU with ``quantization`` ("none": exact fp32) applied to its linears by the engine."""
    from minivllm import LLM

    return LLM(device="cpu", dtype="float32", quantization=quantization, **options)


def decoder_built_in() -> bool:
    """Whether ``Qwen3ForCausalLM.forward`` itself hands decode steps to ``model.block_decoder``."""
    from minivllm.model.qwen3 import Qwen3ForCausalLM

    return "block_decoder" in inspect.getsource(Qwen3ForCausalLM.forward)


@contextlib.contextmanager
def decoder_hook(on: bool = True):
    """While open, ``Qwen3ForCausalLM.forward`` gives the steps ``model.block_decoder`` accepts
    (:mod:`minivllm.model.q4_decode`: decode-only, at most ``BlockLinear.max_rows`` rows) to it: patched in
    unless the model already does it; ``on=False``: the module path for every step, the decoder unused."""
    from minivllm.model.qwen3 import Qwen3ForCausalLM

    original = Qwen3ForCausalLM.forward
    built_in = decoder_built_in()

    def forward(self, input_ids, positions, attn_metadata=None):
        decoder = getattr(self, "block_decoder", None)
        if on and decoder is not None and decoder.accepts(input_ids, attn_metadata):
            return decoder(input_ids, positions, attn_metadata)
        if built_in:  # the model's own hook must not run: hide the decoder from it
            self.block_decoder = None
            try:
                return original(self, input_ids, positions, attn_metadata)
            finally:
                self.block_decoder = decoder
        return original(self, input_ids, positions, attn_metadata)

    Qwen3ForCausalLM.forward = forward
    try:
        yield
    finally:
        Qwen3ForCausalLM.forward = original


@contextlib.contextmanager
def block_rows(rows: int):
    """``BlockLinear.max_rows`` set to ``rows`` for a while (the block kernels for up to ``rows`` rows)."""
    from minivllm.model.quant import BlockLinear

    old = BlockLinear.max_rows
    BlockLinear.max_rows = rows
    try:
        yield
    finally:
        BlockLinear.max_rows = old


def quality_text(tokens: int, tokenizer) -> list[int]:
    path = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
    ids = tokenizer.encode(path.read_text(), add_special_tokens=False)[:tokens]
    assert len(ids) == tokens, f"{path} is too short for {tokens} tokens"
    return ids


@torch.inference_mode()
def run_quality(args) -> dict:
    from minivllm.default_model import default_model_path
    from minivllm.model import load_model
    from minivllm.model.quant import quantize_model
    from minivllm.tokenizer import Tokenizer

    path = default_model_path()
    ids = torch.tensor(quality_text(args.quality_tokens, Tokenizer.from_gguf(path)))
    pos = torch.arange(len(ids))

    def logits(quantization: str) -> torch.Tensor:
        model = quantize_model(load_model(path, device="cpu", dtype=torch.float32, progress=False), quantization)
        with block_rows(len(ids)):  # q4: the block kernels on every row, as decode runs them
            return model.compute_logits(model(ids, pos))[:-1]  # (tokens - 1, vocab): predictions of tokens 1..

    def perplexity(lg: torch.Tensor) -> float:
        return torch.exp(torch.nn.functional.cross_entropy(lg, ids[1:])).item()

    exact = logits("none")
    out = {"text": "CPython LICENSE.txt, first tokens", "tokens": len(ids), "fp32_perplexity": round(perplexity(exact), 4)}
    for q in ("q4", "fp16", "int8"):
        lg = logits(q)
        out[q] = {"top1_agreement": round((lg.argmax(-1) == exact.argmax(-1)).float().mean().item(), 4),
                  "perplexity": round(perplexity(lg), 4),
                  "perplexity_ratio": round(perplexity(lg) / out["fp32_perplexity"], 4),
                  "max_abs_logit_diff": round((lg - exact).abs().max().item(), 4)}
    return out


def decode_rate(fn, max_tokens: int) -> tuple[float, float]:
    """(decode tokens/s after the first token, seconds of the whole run) of ``fn(n)``."""
    start = time.perf_counter()
    fn(1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    fn(max_tokens)
    total = time.perf_counter() - start
    return (max_tokens - 1) / max(total - first, 1e-9), total


def run_rows(args) -> dict:
    """The default model's 30 layers of linears (its own block weights) for 1..8 rows: block kernels vs fbgemm fp16."""
    from minivllm.default_model import default_model_path
    from minivllm.model import load_model
    from minivllm.model.quant import BlockLinear, quantize_model

    model = quantize_model(load_model(default_model_path(), device="cpu", dtype=torch.float32, progress=False), "q4")
    layers = [m for m in model.model.modules() if isinstance(m, BlockLinear)]  # qkv, o, gate_up, down x 30
    out: dict = {"layers": len(layers), "weights": sum(m.in_features * m.out_features for m in layers),
                 "block_bytes": sum(m.blocks.nbytes for m in layers), "ms": {}, "load_avg_1min": [load()]}
    for rows in range(1, 9):
        xs = {k: torch.randn(rows, k) for k in {m.in_features for m in layers}}
        best = {"blocks": float("inf"), "fp16": float("inf")}
        for _ in range(args.repeats + 2):  # alternate, best of each
            for kind in best:
                start = time.perf_counter()
                for m in layers:
                    m.blocks.matmul(xs[m.in_features]) if kind == "blocks" else m.fp16(xs[m.in_features])
                best[kind] = min(best[kind], time.perf_counter() - start)
        out["ms"][rows] = {k: round(v * 1e3, 2) for k, v in best.items()}
    out["load_avg_1min"].append(load())
    out["block_weights_per_s_1_row"] = round(out["weights"] / out["ms"][1]["blocks"] * 1e3 / 1e9, 2)  # G weights/s
    out["blocks_faster_up_to_rows"] = max([r for r, v in out["ms"].items() if v["blocks"] < v["fp16"]], default=0)
    out["max_rows"] = BlockLinear.max_rows
    return out


def run_batch1(args) -> dict:
    from bench.throughput import run_llama_cpp, transformers_generate, transformers_model
    from minivllm.model.q4 import numba_threads
    from minivllm.sampling_params import SamplingParams

    llms = {f"minivllm_{q}": fast_llm(q, max_model_len=1024) for q in (FAST, "fp16")}
    llms["minivllm_fp32"] = fast_llm("none", max_model_len=1024)
    ids = llms["minivllm_fp32"].tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)

    def engine(llm):
        return lambda n: llm.generate([ids], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                                      use_tqdm=False)[0].outputs[0].token_ids

    def hooked(fn, on: bool):
        def run(n):
            with decoder_hook(on):
                return fn(n)
        return run

    runners = {name: hooked(engine(llm), False) for name, llm in llms.items()}
    runners[f"minivllm_{FAST}_decoder"] = hooked(engine(llms[f"minivllm_{FAST}"]), True)
    hf = transformers_model(None, torch.device("cpu"), torch.float32)
    runners["transformers"] = lambda n: transformers_generate(hf, [ids], [n], 1, torch.device("cpu"))[1][0]
    try:
        from llama_cpp import Llama  # noqa: F401

        runners["llama_cpp"] = lambda n: run_llama_cpp([ids], [n], args.threads)["_tokens"][0]
    except ImportError:
        pass
    tokens = {name: fn(32) for name, fn in runners.items()}  # warm-up, and the same 32 greedy tokens?
    rates: dict[str, list[float]] = {name: [] for name in runners}
    loads = [load()]
    for _ in range(args.repeats):
        for name, fn in runners.items():  # alternate, so background load hits every peer
            rates[name].append(round(decode_rate(fn, args.max_tokens)[0], 2))
        loads.append(load())
    fast = f"minivllm_{FAST}_decoder"  # the CPU default with the decode hook (see decoder_hook)
    threads = {}
    for n in (1, 2):  # the fast path's threads: torch's and numba's together
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        with numba_threads(n):
            threads[n] = round(max(decode_rate(runners[fast], args.max_tokens)[0] for _ in range(2)), 2)
        torch.set_num_threads(old)
    best = {name: max(r) for name, r in rates.items()}
    out = {"prompt_tokens": len(ids), "max_tokens": args.max_tokens, "repeats": args.repeats, "fast_path": fast,
           "decode_tokens_per_s_best": best, "decode_tokens_per_s_runs": rates, "load_avg_1min": loads,
           "fast_path_threads_sweep": threads, "torch_threads": torch.get_num_threads(),
           "same_32_greedy_tokens_as_fp32": {k: v == tokens["minivllm_fp32"] for k, v in tokens.items()},
           "llama_cpp": "measured" if "llama_cpp" in runners else "not installed (llama_cpp not importable)",
           "block_decoder": "in Qwen3ForCausalLM.forward" if decoder_built_in() else "hook patched in by the bench",
           "decoder_vs_module_path": round(best[fast] / best[f"minivllm_{FAST}"], 2),
           "fast_vs_fp16": round(best[fast] / best["minivllm_fp16"], 2),
           "fast_vs_fp32": round(best[fast] / best["minivllm_fp32"], 2),
           "fast_vs_transformers": round(best[fast] / best["transformers"], 2)}
    if "llama_cpp" in best:
        out["fast_vs_llama_cpp"] = round(best[fast] / best["llama_cpp"], 2)
    return out


@contextlib.contextmanager
def step_timers():
    """Wall time of each part of an engine step, summed while the block is open: patches the parts' methods
    (restored on exit); a part's time excludes the timed parts inside it (a linear inside the LM head)."""
    from minivllm import engine as engine_module
    from minivllm import runner as runner_module
    from minivllm.model import layers, quant, qwen3

    times: dict[str, float] = collections.defaultdict(float)
    inner: list[float] = []  # the timed time inside each open part

    def timed(fn, label):
        def part(*a, **k):
            start = time.perf_counter()
            inner.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                took, nested = time.perf_counter() - start, inner.pop()
                times[label] += took - nested
                if inner:
                    inner[-1] += took
        return part

    parts = [(engine_module.LLMEngine, "step", "engine (schedule, postprocess, outputs)"),
             (engine_module.LLMEngine, "sample", "sampler"),
             (runner_module.ModelRunner, "execute", "runner (inputs, attention metadata)"),
             (qwen3.Qwen3ForCausalLM, "forward", "model glue (embedding, reshapes, module calls)"),
             (qwen3, "attention", "attention (KV store, paged decode)"),
             (qwen3.RMSNorm, "forward", "rms_norm"),
             (qwen3.RotaryEmbedding, "forward", "rope"),
             (layers, "silu_and_mul", "silu_and_mul")]
    parts += [(cls, "forward", "linears (qkv, o, gate_up, down, lm_head)") for cls in set(quant.LAYERS.values())]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in parts]
    for owner, name, label in parts:
        setattr(owner, name, timed(getattr(owner, name), label))
    try:
        yield times
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def run_breakdown(args) -> dict:
    from minivllm.sampling_params import SamplingParams

    out = {}
    for q, on in ((FAST, False), (FAST, True), ("fp16", False)):
        label = f"{q}_decoder" if on else q
        llm = fast_llm(q, max_model_len=1024)
        ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
        with decoder_hook(on):  # warm-up (compiles, or loads from numba's cache, what the steps run)
            llm.generate([ids], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        engine = llm.engine
        rid = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=args.max_tokens + 8, ignore_eos=True))
        engine.step()  # the prompt (one prefill step at the CPU budget for a short prompt)
        before = load()
        with decoder_hook(on), step_timers() as times:
            start = time.perf_counter()
            for _ in range(args.max_tokens):
                engine.step()
            total = time.perf_counter() - start
        engine.abort(rid)
        per_step = {k: round(v / args.max_tokens * 1e3, 2) for k, v in sorted(times.items(), key=lambda kv: -kv[1])}
        out[label] = {"step_ms": round(total / args.max_tokens * 1e3, 2), "parts_ms": per_step,
                      "steps": args.max_tokens, "load_avg_1min": [before, load()]}
        print(f"  {label}: {out[label]['step_ms']} ms/step", per_step, flush=True)
        del llm
    return out


def run_chats32(args, batch1: dict | None) -> dict:
    from bench.throughput import QUESTIONS, run_engine

    llm = fast_llm(FAST, max_model_len=512)
    tok = llm.tokenizer
    rng = random.Random(0)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS[:32]]
    max_tokens = [rng.randint(64, 128) for _ in prompts]
    before = load()
    run_engine(llm, prompts[:2], [4, 4], torch.device("cpu"))  # warm-up
    result = run_engine(llm, prompts, max_tokens, torch.device("cpu"))
    result.pop("_tokens")
    out = {"requests": len(prompts), "max_tokens_range": [64, 128], **result, "load_avg_1min": [before, load()]}
    if batch1:
        for peer in ("transformers", "llama_cpp"):
            if peer in batch1["decode_tokens_per_s_best"]:
                out[f"vs_{peer}_batch1"] = round(result["output_tokens_per_s"] / batch1["decode_tokens_per_s_best"][peer], 2)
    return out


def run_server(args) -> dict:
    from bench.serve import TOPICS, run_level
    from minivllm.server import ServerThread, build_app

    llm = fast_llm(FAST, max_model_len=1024, max_num_seqs=max(args.clients))
    prompts = [f"Write a short story about {t}." for t in TOPICS]
    levels, before = [], load()
    with ServerThread(build_app(llm.engine, model_name="bench")) as server:
        asyncio.run(run_level(server.url, "bench", prompts, 1, 1, 4, False))  # warm-up
        for c in args.clients:
            level = asyncio.run(run_level(server.url, "bench", prompts, c, 1, args.server_tokens, False))
            level["load_avg_1min"] = load()
            levels.append(level)
            print(f"  server {c:3d} clients: {level['output_tokens_per_s']:7.1f} tok/s, ITL p50 "
                  f"{level['itl_ms']['p50']:.1f} ms p99 {level['itl_ms']['p99']:.1f} ms", flush=True)
    return {"max_tokens": args.server_tokens, "levels": levels, "load_avg_1min_start": before}


def run_long_prompt(args) -> dict:
    from minivllm.config import default_max_num_batched_tokens
    from minivllm.sampling_params import SamplingParams

    out = {}
    for budget in (default_max_num_batched_tokens(torch.device("cpu"), 64), 2048):
        llm = fast_llm(FAST, max_model_len=4600, max_num_batched_tokens=budget, enable_prefix_caching=False)
        engine, tok = llm.engine, llm.tokenizer
        chats = [tok.apply_chat_template([{"role": "user", "content": f"Tell me about {t}."}], tokenize=True)
                 for t in ("the sea", "owls", "bread", "rain", "chess", "a train", "the moon", "coffee")]
        streams = [engine.add_request(ids, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
                   for ids in chats]
        for _ in range(4):  # the chats are decoding
            engine.step()
        filler = tok.encode(Path(sys.base_prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                                 "LICENSE.txt").read_text(), add_special_tokens=False)
        long_ids = (filler * 4)[: args.long_tokens]
        long_id = engine.add_request(long_ids, SamplingParams(temperature=0, max_tokens=1))
        before, last, gaps, start, done = load(), time.perf_counter(), [], time.perf_counter(), None
        while done is None:
            outs = engine.step()
            now = time.perf_counter()
            ids = {o.request_id for o in outs}
            if streams[0] in ids:
                gaps.append(now - last)
                last = now
            if long_id in ids and any(o.finished for o in outs if o.request_id == long_id):
                done = now - start
        for rid in streams:
            engine.abort(rid)
        out[str(budget)] = {"max_num_batched_tokens": budget, "long_prompt_tokens": len(long_ids),
                            "max_gap_s": round(max(gaps), 3), "mean_gap_s": round(statistics.fmean(gaps), 3),
                            "long_prompt_ttft_s": round(done, 2), "load_avg_1min": [before, load()]}
        print(f"  budget {budget}: max gap {max(gaps):.2f} s, long prompt done in {done:.1f} s", flush=True)
        del llm
    return out


def verdicts(data: dict) -> dict:
    t, v = TARGETS, {}
    b = data.get("batch1")
    if b:
        v["batch1_vs_transformers"] = [b["fast_vs_transformers"], t["batch1_vs_transformers"]]
        v["batch1_vs_llama_cpp"] = [b.get("fast_vs_llama_cpp", "not measured"), t["batch1_vs_llama_cpp"]]
    c = data.get("chats32")
    if c and "vs_transformers_batch1" in c:
        v["chats32_vs_transformers"] = [c["vs_transformers_batch1"], t["chats32_vs_transformers"]]
    s = data.get("server")
    if s:
        one = next((lv for lv in s["levels"] if lv["concurrency"] == 1), None)
        if one:
            v["server_one_client_tokens_per_s"] = [one["output_tokens_per_s"], t["server_one_client_tokens_per_s"]]
    lp = data.get("long_prompt")
    if lp:
        auto = next(x for x in lp.values() if isinstance(x, dict) and x["max_num_batched_tokens"] != 2048)
        v["long_prompt_max_gap_s"] = [auto["max_gap_s"], t["long_prompt_max_gap_s"]]
    q = data.get("quality")
    if q:
        v["quality_top1_agreement"] = [q[FAST]["top1_agreement"], t["quality_top1_agreement"]]
        v["quality_perplexity_ratio"] = [q[FAST]["perplexity_ratio"], t["quality_perplexity_ratio_max"]]
    met = {}
    for k, (got, want) in v.items():
        if isinstance(got, str):
            met[k] = {"measured": got, "target": want, "met": None}
        else:
            ok = got <= want if k in ("long_prompt_max_gap_s", "quality_perplexity_ratio") else got >= want
            met[k] = {"measured": got, "target": want, "met": ok}
    return met


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Issue 14: the CPU fast path against fp32, transformers and llama.cpp")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quality-tokens", type=int, default=600)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--server-tokens", type=int, default=48)
    p.add_argument("--long-tokens", type=int, default=4000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama.cpp threads")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    data: dict = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf (embedded)", "cpu_count": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "load_avg_1min_start": load(), "block_decoder": "in Qwen3ForCausalLM.forward" if decoder_built_in()
                  else "hook patched in by this benchmark (bench.cpu_fast.decoder_hook) for the decoder runs, "
                       "chats32, server and long_prompt"}
    for section in args.only:
        print(f"== {section}", flush=True)
        start = time.perf_counter()
        if section == "quality":
            data[section] = run_quality(args)
        elif section == "rows":
            data[section] = run_rows(args)
        elif section == "batch1":
            data[section] = run_batch1(args)
        elif section == "breakdown":
            data[section] = run_breakdown(args)
        elif section == "chats32":
            with decoder_hook():
                data[section] = run_chats32(args, data.get("batch1"))
        elif section == "server":
            with decoder_hook():
                data[section] = run_server(args)
        else:
            with decoder_hook():
                data[section] = run_long_prompt(args)
        data[section]["section_s"] = round(time.perf_counter() - start, 1)
        print({k: v for k, v in data[section].items() if not isinstance(v, list) or len(v) < 8}, flush=True)
    data["load_avg_1min_end"] = load()
    data["targets"] = verdicts(data)
    for k, v in data["targets"].items():
        print(f"{k:34s} {v['measured']!s:>14} target {v['target']}  {'met' if v['met'] else 'NOT met' if v['met'] is False else '-'}")
    print(f"saved {save('14_cpu_fast', data, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
