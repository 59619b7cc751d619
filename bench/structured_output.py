"""Structured output's cost per token: the same prompts decoded with and without a JSON schema (default model, CPU).

    python -m bench.structured_output          # saves bench/results/15_structured_output_cpu.json
    python -m bench.structured_output --batches 1 --repeats 1 --free-tokens 4 --schema flag --out /tmp  # dry run

The embedded SmolLM2-135M-Instruct, greedy, the engine's CPU defaults (fp16 linears). Batches of 1 and 8 chat
prompts asking for a JSON record, each decoded three ways, alternating, ``--repeats`` times:

* **free**: no grammar (``ignore_eos``, a fixed length), the baseline a decode step costs;
* **schema**: ``structured_outputs=StructuredOutputsParams(json=SCHEMA)`` as the engine runs it: after the
  forward pass, the grammar's masks are filled (llguidance, CPU) and applied to the logits (torch);
* **schema+thread**: the same, but the masks are filled on a second thread *while* the forward pass runs (they
  depend only on the tokens accepted so far, known before the step starts).

Per decode step (steps where every sequence of the batch decodes): wall time, mask fill time, mask apply time and
the grammar's ``accept`` time, as medians and means (a grammar's first masks cost more: the mean carries them);
the ratio schema / free per step. NOTE: the constrained outputs run longer than ``--free-tokens``, so their later
steps attend over a few more tokens; at these lengths that is a small share of a CPU decode step. Every
constrained output must parse (``json.loads``) and validate (``jsonschema``) against the schema, and the
threaded variant must give exactly the serial one's tokens: both are counted. The 1-minute load average is
recorded before and after (other processes share the cores: on a loaded machine compare the fill and apply
times, which are measured directly, rather than the ratios of whole steps).

Left out: sampling with temperature (the mask costs the same), GPU figures (there the engine already fills the
masks after the runner has queued the step's kernels, before the sampler waits for the logits), grammars other
than a JSON schema, and llguidance's multi-threaded batch fill.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see bench/_harness.py

import torch  # noqa: E402

import minivllm.engine as engine_module  # noqa: E402
from bench._harness import RESULTS, _version, save  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402
from minivllm.structured_output import GrammarMatcher, StructuredOutputsParams, fill_bitmask  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24},
    "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "city", "skills", "active"], "additionalProperties": False}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}  # a few tokens: for dry runs
SCHEMAS = {"record": SCHEMA, "flag": FLAG}
JOBS = ["baker", "pilot", "painter", "nurse", "chemist", "farmer", "teacher", "sailor"]


def prompts(tokenizer, n: int) -> list[list[int]]:
    asks = [f"Describe a fictional {job} as a JSON object with the fields name, age, city, skills and active."
            for job in JOBS[:n]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True, tokenize=True)
            for a in asks]


class Timers:
    """Seconds spent in the grammar's three moves during one engine step (wrapped around the package's functions)."""

    def __init__(self) -> None:
        self.fill = self.apply = self.accept = 0.0
        self._orig = (engine_module.fill_bitmask, engine_module.apply_bitmask, GrammarMatcher.accept)

    def _timed(self, name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, name, getattr(self, name) + time.perf_counter() - t)
        return wrapper

    def __enter__(self) -> "Timers":
        fill, apply, accept = self._orig
        engine_module.fill_bitmask = self._timed("fill", fill)
        engine_module.apply_bitmask = self._timed("apply", apply)
        GrammarMatcher.accept = self._timed("accept", accept)
        return self

    def __exit__(self, *exc) -> None:
        engine_module.fill_bitmask, engine_module.apply_bitmask, GrammarMatcher.accept = self._orig

    def take(self) -> tuple[float, float, float]:
        out = (self.fill, self.apply, self.accept)
        self.fill = self.apply = self.accept = 0.0
        return out


def threaded_step(self, pool: ThreadPoolExecutor, timers: Timers):
    """``LLMEngine.step`` with the masks filled on ``pool`` during the forward pass (the variant measured here)."""
    start = time.monotonic()
    plan = self.scheduler.schedule()
    seqs = plan.sampled_seqs
    grammars = self.processor.grammar_rows(seqs)
    fill = timers._timed("fill", fill_bitmask)  # the time the thread spends filling, as in the serial variant
    future = pool.submit(fill, [m for _, m in grammars]) if grammars else None
    logits = self.runner.execute(plan)
    if logits is None or not seqs:
        sampled = engine_module.SampledTokens()
    else:
        if future is not None:
            logits = engine_module.apply_bitmask(logits, future.result(), [row for row, _ in grammars])
        sampled = engine_module.SampledTokens.from_sampler(
            self.sampler(logits, self.processor.sampling_batch(seqs, logits.device)))
    self.scheduler.postprocess(plan, sampled.token_ids)
    return self.processor.process(plan, sampled, start, graph=self.runner.last_step_graph)


def decode(llm, ids: list[list[int]], params: SamplingParams, variant: str, pool: ThreadPoolExecutor) -> dict:
    """Run one batch to the end; per full-batch decode step: wall, fill, apply and accept seconds."""
    engine = llm.engine
    rids = [engine.add_request(p, params) for p in ids]
    outputs, steps = {}, []
    with Timers() as timers:
        step = types.MethodType(lambda self: threaded_step(self, pool, timers), engine) if variant == "thread" \
            else engine.step
        while engine.has_unfinished_requests():
            timers.take()
            t = time.perf_counter()
            for out in step():
                if out.finished:
                    outputs[out.request_id] = out
            wall = time.perf_counter() - t
            fill, apply, accept = timers.take()
            record = engine.step_log[-1]
            if record.num_prefill_tokens == 0 and record.num_decode_tokens == len(ids):
                steps.append((wall, fill, apply, accept))
    return {"steps": steps, "outputs": [outputs[r].outputs[0] for r in rids]}


def ms(values: list[float], how=statistics.median) -> float | None:
    return round(how(values) * 1e3, 4) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--free-tokens", type=int, default=48,
                        help="the unconstrained run's length (ignore_eos: every step decodes the whole batch)")
    parser.add_argument("--schema", choices=SCHEMAS, default="record", help="record (5 fields) or flag (dry runs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = parser.parse_args(argv)
    import jsonschema

    from minivllm import LLM

    load_start = os.getloadavg()[0]
    llm = LLM(device="cpu")
    free = SamplingParams(temperature=0, max_tokens=args.free_tokens, ignore_eos=True)
    json_schema = SCHEMAS[args.schema]
    schema = SamplingParams(temperature=0, max_tokens=400, structured_outputs=StructuredOutputsParams(json=json_schema))
    pool = ThreadPoolExecutor(1, thread_name_prefix="masks")
    warm_up = dataclasses.replace(schema, max_tokens=2)  # the grammar's view of the vocabulary is built once (~0.2 s)
    decode(llm, prompts(llm.tokenizer, 1), warm_up, "serial", pool)
    results = {}
    for batch in args.batches:
        ids = prompts(llm.tokenizer, batch)
        runs = {"free": [], "schema": [], "schema+thread": []}
        parsed = valid = identical = total = 0
        texts, tokens = [], []
        for _ in range(args.repeats):
            for name, params, variant in (("free", free, "serial"), ("schema", schema, "serial"),
                                          ("schema+thread", schema, "thread")):
                run = decode(llm, ids, params, variant, pool)
                runs[name].append(run)
            for serial_out, thread_out in zip(runs["schema"][-1]["outputs"], runs["schema+thread"][-1]["outputs"]):
                identical += list(serial_out.token_ids) == list(thread_out.token_ids)
                for out in (serial_out, thread_out):
                    total += 1
                    try:
                        value = json.loads(out.text)
                        parsed += 1
                        jsonschema.validate(value, json_schema)
                        valid += 1
                    except (json.JSONDecodeError, jsonschema.ValidationError):
                        pass
        for out in runs["schema"][0]["outputs"]:
            texts.append(out.text)
            tokens.append(len(out.token_ids))
        row = {}
        for name, rs in runs.items():
            steps = [s for r in rs for s in r["steps"]]
            row[name] = {"decode_steps": len(steps),
                         "step_ms_median": ms([s[0] for s in steps]),
                         "step_ms_mean": ms([s[0] for s in steps], statistics.fmean),
                         "per_token_ms_median": round(ms([s[0] for s in steps]) / batch, 4),
                         "mask_fill_ms_median": ms([s[1] for s in steps]),
                         "mask_fill_ms_mean": ms([s[1] for s in steps], statistics.fmean),
                         "mask_apply_ms_median": ms([s[2] for s in steps]),
                         "mask_apply_ms_mean": ms([s[2] for s in steps], statistics.fmean),
                         "accept_ms_median": ms([s[3] for s in steps]),
                         "accept_ms_mean": ms([s[3] for s in steps], statistics.fmean),
                         "step_ms_per_repeat": [ms([s[0] for s in r["steps"]]) for r in rs]}
        base = row["free"]["step_ms_median"]
        row["ratio_schema_vs_free"] = round(row["schema"]["step_ms_median"] / base, 4)
        row["ratio_thread_vs_free"] = round(row["schema+thread"]["step_ms_median"] / base, 4)
        row["ratio_thread_vs_schema"] = round(row["schema+thread"]["step_ms_median"]
                                              / row["schema"]["step_ms_median"], 4)
        sch = row["schema"]  # the grammar's share of a constrained step, on means (they carry the slow first masks)
        row["grammar_share_of_schema_step"] = round(
            (sch["mask_fill_ms_mean"] + sch["mask_apply_ms_mean"] + sch["accept_ms_mean"]) / sch["step_ms_mean"], 4)
        row["constrained_outputs"] = {"total": total, "parsed": parsed, "valid": valid,
                                      "thread_tokens_identical_to_serial": f"{identical}/{total // 2}"}
        row["output_tokens"] = tokens
        row["example_outputs"] = texts[:3]
        row["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
        results[f"batch{batch}"] = row
        print(f"batch {batch}:", json.dumps({k: v for k, v in row.items() if k not in ("example_outputs",)}, indent=1))
    path = save(f"15_structured_output_{'cpu' if args.out == RESULTS else 'dry_run'}", {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (embedded), engine CPU defaults (fp16 linears)",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "llguidance": _version("llguidance"),
        "load_avg_1min_start": round(load_start, 2), "repeats": args.repeats, "free_tokens": args.free_tokens,
        "sampling": "greedy", "schema": json_schema, "results": results}, out_dir=args.out)
    print("saved", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
