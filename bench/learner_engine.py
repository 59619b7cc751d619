"""The learner's engine against the package's, on the default model: which parts are whose, and the same tokens?

    python -m bench.learner_engine --workspace solutions/workspace   # after running the solution notebooks

Builds ``LLM(learner=WORKSPACE)`` and ``LLM()`` (``--dtype``) on this machine's device (on a GPU the learner's kernels run:
RMSNorm, RoPE, SwiGLU, flash-attention prefill, store_kv, paged decode attention), asks both the same chat
questions greedily (plus a batch large enough for CUDA graphs and a long prompt that is prefilled in chunks),
and records per component whose it was and whether every output's tokens are identical; where two outputs
part, the token and the package's margin between its top two tokens there (in bf16 a near tie can flip: the
learner's kernels accumulate in fp32 where SDPA rounds to bf16; fp32 runs should agree exactly). Not a benchmark of
speed: a record that the engine a learner builds in the notebooks serves what the package serves.
Saves bench/results/13_learner_engine_<cpu|cuda>_<dtype>.json.
"""

import argparse
import time
from pathlib import Path

from bench._harness import RESULTS, save
from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Write one sentence about the Moon.", "Why is the sky blue?", "Say hello in French.",
             "What is a prime number?", "Give me a word that rhymes with cat."]


def answers(llm: LLM, long_text: str):
    """Token ids, texts, per-token top-2 logprobs, seconds."""
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    convs.append([{"role": "user", "content": long_text + " Summarize this in one sentence."}])
    start = time.perf_counter()
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=24, logprobs=2), use_tqdm=False)
    seconds = time.perf_counter() - start
    return ([list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs],
            [o.outputs[0].logprobs for o in outs], seconds)


def divergence(mine: list[int], ref: list[int], ref_logprobs) -> dict | None:
    """Where two greedy outputs part, and how close the package's top two tokens were there (a near tie)."""
    at = next((i for i, (a, b) in enumerate(zip(mine, ref)) if a != b), None)
    if at is None:
        return None if len(mine) == len(ref) else {"token": min(len(mine), len(ref)), "margin": None}
    top = sorted(ref_logprobs[at].values(), reverse=True) if ref_logprobs else []
    return {"token": at, "margin": round(top[0] - top[1], 4) if len(top) > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", default="solutions/workspace", help="the learner's workspace folder")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU), float32, bfloat16")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    knobs = dict(max_num_seqs=16, max_num_batched_tokens=128, dtype=args.dtype)  # the long prompt is prefilled in chunks
    long_text = " ".join(["The lighthouse keeper climbed the stairs every night and lit the lamp."] * 12)
    mine = LLM(learner=args.workspace, **knobs)
    report = [{"component": n, "whose": w, "why": why} for n, w, why in mine.engine.learner_report]
    my_tokens, my_text, _, my_seconds = answers(mine, long_text)
    mine.engine.check_no_leaks()
    device = str(mine.engine.device)
    del mine
    package = LLM(**knobs)
    ref_tokens, ref_text, ref_logprobs, ref_seconds = answers(package, long_text)
    same = [a == b for a, b in zip(my_tokens, ref_tokens)]
    parted = [divergence(a, b, lp) for a, b, lp in zip(my_tokens, ref_tokens, ref_logprobs)]
    dtype = str(package.engine.dtype).removeprefix("torch.")
    name = f"13_learner_engine_{'cuda' if device.startswith('cuda') else 'cpu'}_{dtype}"
    data = {"workspace": args.workspace, "device": device, "components": report,
            "yours": sorted(r["component"] for r in report if r["whose"] == "yours"),
            "identical_outputs": sum(same), "num_outputs": len(same), "all_identical": all(same),
            "seconds": {"learner": round(my_seconds, 2), "package": round(ref_seconds, 2)},
            "answers": [{"question": q, "learner": a, "package": b, "diverged": d}
                        for q, a, b, d in zip([*QUESTIONS, "(a long prompt, chunked)"], my_text, ref_text, parted)]}
    print("\n".join(f"{r['whose']:8} {r['component']:20} {r['why']}" for r in report))
    print(f"{sum(same)}/{len(same)} outputs token-identical ({dtype}); learner {my_seconds:.2f} s, package "
          f"{ref_seconds:.2f} s; where they part (token, the package's top-2 logprob margin there): "
          f"{[d for d in parted if d]}")
    print("saved", save(name, data, args.out))


if __name__ == "__main__":
    main()
