"""Where a batch-1 decode step's time goes: each kind of kernel knocked out of the replayed graph in turn.

    python -m bench.knockout --device cuda       # Qwen3-0.6B shapes, random bf16 weights; 17_knockout_cuda.json
    python -m bench.knockout --config tiny       # a dry run on a tiny model (any device; on a CPU only the
                                                 # norms and matmuls are the knocked-out functions' to replace)

A profiler lists each kernel's time, but with programmatic dependent launch (kernels._pdl) kernels overlap: a
kernel's listed time includes waiting for the one before, and the times add up to more than the step. What a
kernel *costs* the step is what the step saves without it. So this benchmark builds the engine once per
knockout, with one kind of step replaced by a function that launches nothing and returns a tensor of the right
shape (allocated once per shape; its values are garbage, so are the tokens), and times batch-1 decode as
``bench.latency`` does: ``(last token time - first token time) / (tokens - 1)``, the median of ``--repeats`` runs.
The kinds, in every decoder layer:

* ``norms``: the RMSNorms (``layers.rms_norm``, ``layers.fused_add_rms_norm``; the residual add goes with them);
* ``qkv_proj``, ``o_proj``, ``gate_up_proj``: those matmuls (``layers.linear`` on that weight's shape);
* ``down_proj``: SiLU·mul and ``down_proj`` (one kernel at batch 1, ``layers.silu_and_mul_linear``);
* ``qkv_prep``: QK-norm + RoPE + the KV store (``layers.qkv_prep``). A batch-1 step does them inside its attention
  kernel (``kernels.paged_decode_prep``), so this knockout also sends the step back to attention alone (the kernel
  that reads q, ``kernels.paged_attention_warp``): what remains is attention without any preparation;
* ``attention``: paged decode attention (a batch-1 step's ``kernels.paged_decode_prep``, its preparation included);
* ``layers``: all of the above: what is left is the embedding, the final norm, the LM head, sampling and the
  host's share of a step.

``none`` is the engine as it is. Prefill steps run eagerly here (``cuda_graph_max_tokens=0``), so a knockout never
meets a piecewise graph's split; the decode graphs are captured with the knockout in place.
"""

import argparse
import os
import random
import statistics
import time
from contextlib import ExitStack, contextmanager
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see bench/throughput.py

import torch  # noqa: E402

from bench._harness import engine_parser, engine_config, free_memory, model_spec, random_ids, resolve_device  # noqa
from bench._harness import save_tagged  # noqa: E402

NAME = "17_knockout"
KINDS = ("norms", "qkv_proj", "qkv_prep", "attention", "o_proj", "gate_up_proj", "down_proj")
KNOCKOUTS = ("none", *KINDS, "layers")


class _Blanks:
    """Tensors of a shape, made once each (``torch.empty`` launches nothing), handed out instead of a result."""

    def __init__(self):
        self._made: dict = {}

    def __call__(self, shape, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(shape), like.dtype, like.device)
        if key not in self._made:
            self._made[key] = torch.zeros(key[0], dtype=like.dtype, device=like.device)
        return self._made[key]


@contextmanager
def knocked_out(kinds, config):
    """Patch the model's steps of these kinds (``KINDS``) to launch nothing, while the engine is built and run."""
    from minivllm.model import layers, qwen3

    blank = _Blanks()
    kinds = set(kinds)
    hidden, q_size, kv_size = config.hidden_size, config.q_size, config.kv_size
    shapes = {"qkv_proj": (q_size + 2 * kv_size, hidden), "o_proj": (hidden, q_size),
              "gate_up_proj": (2 * config.intermediate_size, hidden)}  # weight shapes (out, in): the LM head is none
    knocked = {tuple(s) for k, s in shapes.items() if k in kinds}
    linear = layers.linear

    def fake_linear(x, weight):
        if tuple(weight.shape) in knocked:
            return blank((*x.shape[:-1], weight.shape[0]), x)
        return linear(x, weight)

    def fake_qkv_prep(qkv, q_heads, kv_heads, *args):
        d = config.head_dim
        return (blank((qkv.shape[0], q_heads, d), qkv), blank((qkv.shape[0], kv_heads, d), qkv),
                blank((qkv.shape[0], kv_heads, d), qkv))

    with ExitStack() as stack:
        if kinds & {"qkv_proj", "o_proj", "gate_up_proj"}:
            stack.enter_context(mock.patch.object(layers, "linear", fake_linear))
        if "norms" in kinds:
            stack.enter_context(mock.patch.object(layers, "rms_norm", lambda x, w, eps: x.contiguous()))
            stack.enter_context(mock.patch.object(layers, "fused_add_rms_norm", lambda x, r, w, eps: (x, r)))
        if "qkv_prep" in kinds:
            stack.enter_context(mock.patch.object(layers, "qkv_prep", fake_qkv_prep))
            stack.enter_context(mock.patch.object(layers, "decode_prep_fits", lambda *a: False))
        if "attention" in kinds:
            stack.enter_context(mock.patch.object(
                qwen3, "paged_attention", lambda q, k, v, layer, meta, stored=False: blank(
                    (q.shape[0], q.shape[1] * q.shape[2]), q)))
            stack.enter_context(mock.patch.object(
                layers, "paged_decode_prep", lambda qkv, q_heads, kv_heads, *a: blank(
                    (qkv.shape[0], q_heads, config.head_dim), qkv)))
        if "down_proj" in kinds:
            stack.enter_context(mock.patch.object(
                layers, "silu_and_mul_linear", lambda gate_up, weight: blank((gate_up.shape[0], weight.shape[0]),
                                                                             gate_up)))
        yield


def decode_ms(llm, prompt_len: int, output_len: int, repeats: int, rng: random.Random) -> list[float]:
    """Batch-1 decode ms per token after the first, one run per repeat after a warm-up run."""
    from minivllm.sampling_params import SamplingParams

    engine, vocab = llm.engine, llm.engine.model.config.vocab_size
    runs = []
    for i in range(repeats + 1):
        rid = engine.add_request(random_ids(rng, prompt_len, vocab),
                                 SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
        metrics = None
        while metrics is None:
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    metrics = out.metrics
        if i:
            runs.append((metrics.last_token_time - metrics.first_token_time) / (output_len - 1) * 1e3)
    engine.check_no_leaks()
    return runs


def run(args: argparse.Namespace) -> dict:
    from minivllm.llm import LLM

    device = resolve_device(args.device)
    name, mc = model_spec(args.config, device)
    if mc is None:
        raise SystemExit("bench.knockout takes a random model's shapes: --config qwen3-0.6b or tiny")
    options = dict(max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=1, enable_prefix_caching=False,
                   cuda_graph_max_tokens=0, cuda_graph_max_batch=1)
    result: dict = {"device": device.type, "config": name, "prompt_len": args.prompt_len,
                    "output_len": args.output_len, "repeats": args.repeats, "engine": options, "knockouts": {}}
    for knockout in args.knockouts:
        kinds = KINDS if knockout == "layers" else (() if knockout == "none" else (knockout,))
        llm = None
        with knocked_out(kinds, mc):
            start = time.perf_counter()
            llm = LLM(**engine_config(name, mc, device, seed=args.seed, **options))
            setup = time.perf_counter() - start
            runs = decode_ms(llm, args.prompt_len, args.output_len, args.repeats, random.Random(args.seed))
        result["knockouts"][knockout] = {"decode_ms_per_token": round(statistics.median(runs), 4),
                                         "runs": [round(r, 4) for r in runs], "setup_s": round(setup, 2)}
        print(f"{name} on {device.type}, without {knockout:13s}: decode {statistics.median(runs):.3f} ms/token",
              flush=True)
        del llm
        free_memory()
    base = result["knockouts"].get("none")
    if base:
        result["saved_ms_per_token"] = {k: round(base["decode_ms_per_token"] - v["decode_ms_per_token"], 4)
                                        for k, v in result["knockouts"].items() if k != "none"}
    return result


def parser() -> argparse.ArgumentParser:
    p = engine_parser("Batch-1 decode with each kind of step knocked out of the model")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--knockouts", nargs="+", choices=KNOCKOUTS, default=list(KNOCKOUTS))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    data = run(args)
    print(f"saved {save_tagged(NAME, data, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
