"""Where the offline workload's time goes: steps grouped by kind, host phases, and a profile of one mixed step.

    python -m bench.step_breakdown                 # GPU: Qwen3-0.6B shapes, random bf16 weights, 256 requests
    python -m bench.step_breakdown --out DIR       # e.g. $OUT on the device machine

Three passes over the same seeded workload as ``bench.throughput`` (prompt and output lengths uniform in
100..1024):

1. **steps**: the engine unchanged; its ``step_log`` says for every step how many decode and prefill tokens it
   computed and how long it took. Steps are grouped by kind (decode-only, prefill-only, mixed) and by size.
2. **phases**: each phase of ``LLMEngine.step`` timed with a device synchronize around it (schedule, execute,
   sample, postprocess, process), on prefill-holding and decode-only steps apart. Synchronizing costs a little
   overlap, so pass 1's totals are the ones of record.
3. **profile**: ``torch.profiler`` over the first mixed step (prefill chunks beside decodes): its top GPU
   kernels and top CPU ops.

Writes ``bench/results/17_step_breakdown_<device>.json``. Left out: CUDA-graph capture time (start-up).
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench._harness import RESULTS, free_memory, model_spec, random_ids, resolve_device, save, sync
from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams

PHASES = (("scheduler", "schedule"), ("runner", "execute"), ("engine", "sample"), ("scheduler", "postprocess"),
          ("processor", "process"))


def make_llm(mc, device: torch.device) -> LLM:
    return LLM(mc, device=device.type, max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192,
               gpu_memory_utilization=0.6, enable_prefix_caching=False)


def add_workload(engine, mc, num_requests: int, seed: int) -> int:
    rng = random.Random(seed)
    lens = [rng.randint(100, 1024) for _ in range(num_requests)]
    outs = [rng.randint(100, 1024) for _ in range(num_requests)]
    for n, m in zip(lens, outs):
        engine.add_request(random_ids(rng, n, mc.vocab_size), SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
    return sum(outs)


def kind(rec) -> str:
    if rec.num_prefill_tokens == 0:
        return "decode_only"
    return "prefill_only" if rec.num_decode_tokens == 0 else "mixed"


def group(records) -> dict:
    out = {}
    for name in ("decode_only", "prefill_only", "mixed"):
        rs = [r for r in records if kind(r) == name]
        if not rs:
            continue
        ms = [(r.end - r.start) * 1e3 for r in rs]
        out[name] = {"steps": len(rs), "seconds": round(sum(ms) / 1e3, 3), "ms_mean": round(statistics.fmean(ms), 2),
                     "ms_max": round(max(ms), 2), "prefill_tokens": sum(r.num_prefill_tokens for r in rs),
                     "decode_tokens": sum(r.num_decode_tokens for r in rs),
                     "graph_steps": sum(r.graph for r in rs)}
        if name != "decode_only" and out[name]["seconds"]:
            out[name]["prefill_tokens_per_s"] = round(out[name]["prefill_tokens"] / out[name]["seconds"], 1)
    return out


def pass_steps(mc, device, args) -> dict:
    llm = make_llm(mc, device)
    engine = llm.engine
    output_tokens = add_workload(engine, mc, args.num_requests, args.seed)
    sync(device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync(device)
    seconds = time.perf_counter() - start
    records = list(engine.step_log)
    result = {"seconds": round(seconds, 3), "output_tokens": output_tokens,
              "output_tokens_per_s": round(output_tokens / seconds, 1), "steps": len(records), "by_kind": group(records),
              "largest_prefill_steps": [
                  {"step": r.step, "ms": round((r.end - r.start) * 1e3, 2), "prefill_tokens": r.num_prefill_tokens,
                   "decode_tokens": r.num_decode_tokens, "sequences": len(r.seqs)}
                  for r in sorted(records, key=lambda r: r.end - r.start, reverse=True)[:8]]}
    del llm, engine
    free_memory()
    return result


def pass_phases_and_profile(mc, device, args) -> tuple[dict, dict]:
    llm = make_llm(mc, device)
    engine = llm.engine
    add_workload(engine, mc, args.num_requests, args.seed)
    owners = {"scheduler": engine.scheduler, "runner": engine.runner, "engine": engine, "processor": engine.processor}
    current = {"t": {}}

    def timed(obj, name):
        f = getattr(obj, name)

        def g(*a, **k):
            sync(device)
            t = time.perf_counter()
            r = f(*a, **k)
            sync(device)
            current["t"][name] = current["t"].get(name, 0.0) + time.perf_counter() - t
            return r
        setattr(obj, name, g)

    for owner, name in PHASES:
        timed(owners[owner], name)
    totals = {"with_prefill": {}, "decode_only": {}}
    counts = {"with_prefill": 0, "decode_only": 0}
    profiled = None
    while engine.has_unfinished_requests() and (profiled is None or sum(counts.values()) < args.phase_steps):
        current["t"] = {}
        if profiled is None and len(engine.step_log) >= 2 and kind(engine.step_log[-1]) == "mixed":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step()
                sync(device)
            rec = engine.step_log[-1]
            profiled = {"step": rec.step, "kind": kind(rec), "prefill_tokens": rec.num_prefill_tokens,
                        "decode_tokens": rec.num_decode_tokens, "ms": round((rec.end - rec.start) * 1e3, 2),
                        "top_gpu": top(prof, "device"), "top_cpu": top(prof, "cpu")}
            continue
        engine.step()
        which = "decode_only" if kind(engine.step_log[-1]) == "decode_only" else "with_prefill"
        counts[which] += 1
        for name, s in current["t"].items():
            totals[which][name] = totals[which].get(name, 0.0) + s
    phases = {w: {"steps": counts[w], **{n: round(s / counts[w] * 1e3, 3) for n, s in totals[w].items()}}
              for w in totals if counts[w]}
    del llm, engine
    free_memory()
    return phases, profiled or {}


def top(prof, where: str, n: int = 12) -> list[dict]:
    key = "self_device_time_total" if where == "device" else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:n]
    return [{"name": e.key[:80], "calls": e.count, "ms": round(getattr(e, key, 0.0) / 1e3, 3)} for e in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config", default=None, help="a bench.models name (default: qwen3-0.6b on a GPU, tiny on a CPU)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--phase-steps", type=int, default=120, help="steps timed phase by phase in pass 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    name, mc = model_spec(args.config or ("qwen3-0.6b" if device.type == "cuda" else "tiny"), device)
    if mc is None:
        raise SystemExit("step_breakdown runs on a random-weight model: pass --config")
    args.num_requests = args.num_requests or (256 if device.type == "cuda" else 16)
    steps = pass_steps(mc, device, args)
    phases, profiled = pass_phases_and_profile(mc, device, args)
    data = {"config": name, "device": device.type, "workload": {"requests": args.num_requests, "lengths": "U[100,1024]"},
            "steps": steps, "phases_ms_per_step": phases, "mixed_step_profile": profiled}
    path = save(f"17_step_breakdown_{device.type}", data, args.out)
    print(f"{steps['output_tokens_per_s']:,.0f} output tok/s in {steps['seconds']} s over {steps['steps']} steps")
    for k, g in steps["by_kind"].items():
        print(f"  {k:13s} {g['steps']:5d} steps {g['seconds']:8.2f} s  mean {g['ms_mean']:7.2f} ms  "
              f"prefill tokens {g['prefill_tokens']:7d}")
    print("phases (ms/step):", phases)
    print("mixed step:", {k: v for k, v in profiled.items() if not k.startswith("top")})
    for row in profiled.get("top_gpu", [])[:8]:
        print(f"  gpu {row['ms']:8.3f} ms  {row['calls']:5d}x  {row['name']}")
    print("->", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
