"""The engine's host time per decode step: what the CPU spends around the forward pass, phase by phase.

    python -m bench.host_overhead                      # tiny model on the CPU, 256 sequences at ~800 tokens
    python -m bench.host_overhead --label after        # kept beside earlier labels in the results file
    python -m bench.host_overhead --profile 25         # also print cProfile's top 25 functions of the timed steps
    python -m bench.host_overhead --device cuda --label h200   # the same steps on a GPU (see below)

On a GPU the forward pass is launched asynchronously (a CUDA-graph replay): while it runs, the host is idle
unless it has work of its own, and every millisecond the host spends on scheduling, building input tensors,
sampling bookkeeping and output text is a millisecond the GPU waits. That host work does not depend on the
model's size, so it is measured here, without a GPU: the ``tiny`` random-weight model (``bench.models``) on
the CPU, ``--batch`` sequences whose prompts of ~``--context`` tokens are prefilled first; then only
decode-only steps are timed. Each step is split into the phases of :meth:`LLMEngine.step
<minivllm.engine.LLMEngine.step>`:

* ``schedule``: the scheduler's plan and the step's flat arrays (``Scheduler.schedule``, or ``schedule_ahead``);
* ``inputs``: the runner's input tensors and attention metadata (``ModelRunner.prepare`` and ``launch`` minus the
  model);
* ``forward``: the model's forward pass and logits -- the tiny model on a CPU, *not* a GPU's forward:
  reported apart, and left out of the host time;
* ``sampling_batch``: the sampler's per-row parameter tensors (``OutputProcessor.sampling_batch``);
* ``sampler``: the sampler's ops and copying the tokens to Python (on a tiny vocabulary);
* ``postprocess``: appending tokens, stop tokens and lengths (``Scheduler.postprocess``);
* ``process``: outputs, detokenization, stop strings, the step log (``OutputProcessor.process``).

``--forward replay`` takes the CPU's forward pass out from between the steps: each batch shape's forward pass and
logits are computed once (in the warm-up steps) and then replayed, so between two steps the CPU does nothing, as it
does beside a GPU. The default (``cpu``) runs the tiny model's forward pass on the same core in every step, and that
pass (tens of milliseconds over a 1 GiB KV cache and the weights) evicts the host code's data and instructions from
the CPU's caches, so every step's host work starts cold: measured on the 2-core dev machine (four runs of each), a
decode step's host work took 0.86-1.05 ms that way against 0.26-0.51 ms with the forward pass replayed. A GPU's
forward pass does not touch the CPU's caches, so ``replay`` is the closer model of a GPU engine's host; ``cpu`` is the
pessimistic bound. With ``replay`` every step samples from the same logits (the same tokens): the host's work per step
is the same.

``host`` = the step minus ``forward``; ``host_without_sampler`` leaves out the sampler's tensor ops too, which on a
GPU are device work like the forward pass (here they run on the CPU: a greedy argmax over the tiny vocabulary).
Other processes share this machine's cores, so every phase is timed in CPU time of this thread
(``time.thread_time``; torch and numba held to one thread, so all of a step's work is on it) as well as wall time,
and steps are summarized by their median; the load average is recorded.

With ``--device cuda`` the same model runs in bf16 with CUDA graphs, and every phase is bracketed by a device
synchronize, so ``forward`` is the graph replay's GPU time and ``host`` what the GPU would wait for if nothing
overlapped; read the wall times there (a synchronize spins, so CPU time counts the waiting).

With ``--overlap`` the engine runs its overlapped loop (``async_scheduling=True``): each call plans and prepares
step N+1, queues N's sampler and N+1's forward pass, then post-processes N. On a CPU nothing runs concurrently, so
the phases add up as before; on a GPU every phase but the launches runs while the device computes the next step.

Writes ``bench/results/17_host_overhead_<device>.json`` (one entry per ``--label``). Left out: prefill and
mixed steps, structured output. ``--finishing`` times steps in which sequences end (the batch shrinks).
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench._harness import RESULTS, meta, random_ids, resolve_device, save, sync  # noqa: E402
from bench.models import TINY  # noqa: E402
from minivllm.engine import LLMEngine  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402

import kernels  # noqa: E402, F401  (before numba: it picks numba's CUDA target, the simulator without a GPU)
import numba  # noqa: E402

PHASES = ("schedule", "inputs", "forward", "sampling_batch", "sampler", "postprocess", "process")
NAME = "17_host_overhead"


class Clock:
    """Accumulates (cpu, wall) seconds per phase for the current step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step: dict[str, list[float]] = {}

    def wrap(self, name: str, f):
        def timed(*args, **kwargs):
            sync(self.device)
            c, w = time.thread_time(), time.perf_counter()
            result = f(*args, **kwargs)
            sync(self.device)
            acc = self.step.setdefault(name, [0.0, 0.0])
            acc[0] += time.thread_time() - c
            acc[1] += time.perf_counter() - w
            return result
        return timed


class TimedModel:
    """The runner's model, with its forward pass and logits timed as ``forward``."""

    def __init__(self, model, clock: Clock) -> None:
        self._model = model
        self._forward = clock.wrap("forward", model.__call__)
        self.compute_logits = clock.wrap("forward", model.compute_logits)

    def __call__(self, *args, **kwargs):
        return self._forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


class ReplayedModel:
    """The model, its forward pass and logits computed once per input shape and then replayed (``--forward replay``)."""

    def __init__(self, model) -> None:
        self._model, self._hidden, self._logits = model, {}, {}

    def __call__(self, input_ids, *args, **kwargs):
        key = tuple(input_ids.shape)
        if key not in self._hidden:
            self._hidden[key] = self._model(input_ids, *args, **kwargs)
        return self._hidden[key]

    def compute_logits(self, hidden):
        key = tuple(hidden.shape)
        if key not in self._logits:
            self._logits[key] = self._model.compute_logits(hidden)
        return self._logits[key]

    def __getattr__(self, name):
        return getattr(self._model, name)


class TimedSampler:
    def __init__(self, sampler, clock: Clock) -> None:
        self._call = clock.wrap("sampler", sampler.__call__)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def instrument(engine: LLMEngine, clock: Clock) -> None:
    """Time each phase of ``engine.step`` (instance attributes shadow the methods; the engine is not changed)."""
    engine.scheduler.schedule = clock.wrap("schedule", engine.scheduler.schedule)
    engine.scheduler.schedule_ahead = clock.wrap("schedule", engine.scheduler.schedule_ahead)  # the overlapped loop
    engine.runner.prepare = clock.wrap("prepare", engine.runner.prepare)  # execute() = launch(prepare(plan))
    engine.runner.launch = clock.wrap("launch", engine.runner.launch)
    engine.runner.model = TimedModel(engine.runner.model, clock)
    for graph in engine.runner.graphs.values():  # on a GPU a decode step replays a captured graph instead
        graph.replay = clock.wrap("forward", graph.replay)
    engine.processor.sampling_batch = clock.wrap("sampling_batch", engine.processor.sampling_batch)
    engine.sampler = TimedSampler(engine.sampler, clock)
    engine.scheduler.postprocess = clock.wrap("postprocess", engine.scheduler.postprocess)
    engine.processor.process = clock.wrap("process", engine.processor.process)


def build_engine(args, device: torch.device) -> LLMEngine:
    engine = LLMEngine(model=TINY, device=device.type, dtype="float32" if device.type == "cpu" else "bfloat16",
                       max_model_len=args.context + args.context // 16 + max_tokens(args),
                       max_num_seqs=args.batch, max_num_batched_tokens=8192, gpu_memory_utilization=0.5,
                       kv_cache_memory=2**30, async_scheduling=args.overlap)
    if args.tokenizer != "none":  # the random model has no tokenizer: lend one, so outputs are detokenized
        from minivllm.tokenizer import Tokenizer

        engine.tokenizer = engine.processor.tokenizer = Tokenizer.from_name(args.tokenizer)
    return engine


def max_tokens(args) -> int:
    """Enough for every sequence to decode through the timed steps: the first ones start during the prefill."""
    prefill_steps = args.batch * (args.context + args.context // 16) // 8192 + 1
    return prefill_steps + args.warmup + args.steps + 8


def add_requests(engine: LLMEngine, args) -> None:
    rng = random.Random(args.seed)
    spread = args.context // 16
    for _ in range(args.batch):
        n_out = max_tokens(args)
        if args.finishing and rng.random() < 0.5:  # half the sequences end at spread points of the timed steps
            n_out -= rng.randint(8, args.steps + 8)
        params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
        if args.sampling == "random":
            params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=n_out, ignore_eos=True)
        n = rng.randint(args.context - spread, args.context + spread)
        engine.add_request(random_ids(rng, n, TINY.vocab_size), params, final_only=args.final_only)


def summarize(steps: list[dict[str, list[float]]], index: int) -> dict:
    """Median and mean ms per phase over the timed steps; ``index`` 0: CPU time, 1: wall time."""
    out = {}
    for name in (*PHASES, "step", "host", "host_without_sampler"):
        values = [s.get(name, [0.0, 0.0])[index] * 1e3 for s in steps]
        out[name] = {"median": round(statistics.median(values), 3), "mean": round(statistics.fmean(values), 3)}
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def run(args) -> dict:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    engine = build_engine(args, device)
    add_requests(engine, args)
    t = time.perf_counter()
    while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()
    prefill_s = time.perf_counter() - t
    if args.forward == "replay":
        if device.type != "cpu":
            raise SystemExit("--forward replay is for the CPU (a GPU's forward pass leaves the CPU's caches alone)")
        engine.runner.model = ReplayedModel(engine.runner.model)
    for _ in range(args.warmup):
        engine.step()
    clock = Clock(device)
    instrument(engine, clock)
    step = clock.wrap("step", engine.step)
    steps, batches, profiler = [], [], cProfile.Profile() if args.profile else None
    load = [round(os.getloadavg()[0], 2)]
    for _ in range(args.steps):
        clock.step = {}
        if profiler:
            profiler.enable()
        step()
        if profiler:
            profiler.disable()
        rec = engine.step_log[-1]
        assert rec.num_prefill_tokens == 0 and (args.finishing or rec.num_decode_tokens == args.batch), \
            f"not a full decode step: {rec}"
        batches.append(rec.num_decode_tokens)
        s = clock.step
        prepare, launch, forward = s.pop("prepare"), s.pop("launch"), s.setdefault("forward", [0.0, 0.0])
        s["inputs"] = [prepare[i] + launch[i] - forward[i] for i in (0, 1)]
        s["host"] = [s["step"][i] - s["forward"][i] for i in (0, 1)]
        sampler = s.get("sampler", [0.0, 0.0])
        s["host_without_sampler"] = [s["host"][i] - sampler[i] for i in (0, 1)]
        steps.append(s)
    load.append(round(os.getloadavg()[0], 2))
    contexts = [s.num_tokens for s in engine.scheduler.running]
    result = {
        "date": meta(NAME)["date"], "command": meta(NAME)["command"], "commit": git_commit(),
        "device": device.type, "config": "tiny", "dtype": str(engine.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(), "load_avg_1min": {"start": load[0], "end": load[1]},
        "workload": {"batch": args.batch, "context_mean": round(statistics.fmean(contexts), 1),
                     "context_min": min(contexts), "context_max": max(contexts), "sampling": args.sampling,
                     "final_only": args.final_only, "forward": args.forward, "async_scheduling": args.overlap,
                     "finishing": args.finishing,
                     "timed_batch_mean": round(statistics.fmean(batches), 1),
                     "tokenizer": args.tokenizer, "timed_steps": args.steps, "prefill_seconds": round(prefill_s, 2)},
        "cpu_ms_per_step": summarize(steps, 0), "wall_ms_per_step": summarize(steps, 1),
    }
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.profile)
        print(text.getvalue())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=800, help="prompt tokens per sequence (+-1/16, seeded)")
    p.add_argument("--steps", type=int, default=60, help="decode steps timed")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sampling", default="greedy", choices=["greedy", "random"],
                   help="greedy, or temperature 0.8 + top-p 0.95 on every row")
    p.add_argument("--tokenizer", default="cl100k_base", help="a tiktoken encoding to detokenize with, or none")
    p.add_argument("--label", default="latest", help="the entry of the results file this run replaces")
    p.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions of the timed steps")
    p.add_argument("--final-only", action="store_true",
                   help="requests report only when they finish (LLM.generate's mode), not after every step")
    p.add_argument("--overlap", action="store_true",
                   help="the engine's overlapped loop (async_scheduling=True): step N+1 planned ahead of step N")
    p.add_argument("--finishing", action="store_true",
                   help="about half the sequences end during the timed steps (the batch changes), at spread lengths")
    p.add_argument("--forward", default="cpu", choices=["cpu", "replay"],
                   help="cpu: the tiny model's forward pass runs between the steps (on this core, cold caches after); "
                        "replay: each batch shape's forward pass is computed once and replayed, as beside a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # NOTE: all of a step's work on this thread, so thread_time sees all of it
    numba.set_num_threads(1)  # (the CPU decode attention is a parallel numba kernel)
    result = run(args)
    name = f"{NAME}_{result['device']}"
    path = args.out / f"{name}.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs[args.label] = result
    save(name, {"runs": runs}, args.out)
    cpu, wall = result["cpu_ms_per_step"], result["wall_ms_per_step"]
    print(f"{args.label}: batch {args.batch}, context ~{result['workload']['context_mean']:.0f}, "
          f"load {result['load_avg_1min']}; ms per decode step, median (CPU time / wall)")
    for k in (*PHASES, "step", "host", "host_without_sampler"):
        print(f"  {k:15s} {cpu[k]['median']:8.3f} {wall[k]['median']:8.3f}")
    print("->", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
