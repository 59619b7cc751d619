"""The GPU engine's targets, every figure from one run: each benchmark run in turn, then one table of figure
against target.

    python -m bench.targets                          # on a GPU machine: every part, then the table
    python -m bench.targets --parts throughput host  # some parts (a call with a time limit); --out DIR as below
    python -m bench.targets --summarize DIR          # the table from a folder the parts wrote (no GPU needed)

The parts, each its own benchmark (its command is in its file's ``meta``), all writing into one folder
(``--out``, default ``bench/results/targets``):

* ``throughput``: the offline workload (256 requests, prompts and outputs of 100-1,024 tokens) and
  ``transformers.generate`` on 8 of them (``bench.throughput --device cuda --peer-requests 8``);
* ``latency``: batch-1 decode and the first token of a 1k-token prompt (``bench.latency --modes cuda_graphs``);
* ``attention``: our tensor-core prefill against SDPA's flash backend, and paged decode attention against the
  bandwidth floor (``bench.attention``);
* ``norms``: RMSNorm, fused add + RMSNorm and QK-norm against ``torch.compile`` of the same PyTorch code
  (``bench.norm_variants --defaults-only``: the module's default path);
* ``host``: the host's work per decode step at batch 256, on the CPU with the tiny model and the forward pass
  replayed (``bench.host_overhead --forward replay --overlap --final-only``): what the overlapped loop must hide;
* ``knockout``: no target of its own; where a batch-1 token's time goes (``bench.knockout``: what the step saves
  with each kind of kernel knocked out, and the step with no decoder layer at all), the table's ``batch1_breakdown``.

The table (``17_targets_cuda.json`` in the same folder, and its picture ``17_targets_cuda.png``) says for each
target its figure, the goal, and met or missed; a part that did not run is ``missing``. Every part's file must name
the same commit and GPU, or the table says which differ (figures from different runs do not make one run).
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: the table's picture is written to a file, never shown

from bench._harness import RESULTS, save  # noqa: E402
from minivllm.course import engine_plots  # noqa: E402

NAME = "17_targets_cuda"
PARTS = {  # part -> (benchmark command without --out, the files it writes)
    "throughput": (["bench.throughput", "--device", "cuda", "--peer-requests", "8"], ["12_throughput_cuda"]),
    "latency": (["bench.latency", "--device", "cuda", "--repeats", "3", "--modes", "cuda_graphs"],
                ["12_latency_cuda"]),
    "attention": (["bench.attention"], ["07_attention", "08_paged_attention"]),
    "norms": (["bench.norm_variants", "--defaults-only"], ["17_norm_variants_cuda"]),
    "host": (["bench.host_overhead", "--device", "cpu", "--final-only", "--steps", "120", "--forward", "replay",
              "--overlap", "--label", "targets"], ["17_host_overhead_cpu"]),
    "knockout": (["bench.knockout", "--device", "cuda"], ["17_knockout_cuda"]),
}
PREFILL_TOKENS = (4096, 8192, 16384)  # the prefill target's sizes
NORMS = ("rms_norm", "fused_add_rms_norm", "qk_norm")
NORM_HBM_TOKENS = 16384  # the "% of HBM" target is read at the largest size (bandwidth-bound; small ones are latency)
DECODE_MIN_BATCH, DECODE_MIN_CONTEXT = 32, 2048


@dataclass
class Target:
    measure: str
    figure: float | None  # None: the part that measures it did not run (or failed)
    goal: float
    higher_is_better: bool
    unit: str
    source: str  # the file (and entry) the figure comes from
    detail: str = ""

    @property
    def status(self) -> str:
        if self.figure is None:
            return "missing"
        ok = self.figure >= self.goal if self.higher_is_better else self.figure <= self.goal
        return "met" if ok else "missed"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rows(data: dict | None, key: str) -> list[dict]:
    return [] if data is None else data.get(key) or []


def targets(folder: Path) -> list[Target]:
    """Issue 17's targets read from the part files in ``folder``."""
    thr, lat = _load(folder, "12_throughput_cuda"), _load(folder, "12_latency_cuda")
    attn, paged = _load(folder, "07_attention"), _load(folder, "08_paged_attention")
    norms, host = _load(folder, "17_norm_variants_cuda"), _load(folder, "17_host_overhead_cpu")
    engine = (thr or {}).get("minivllm", {})
    graphs = (lat or {}).get("cuda_graphs", {})
    out = [
        Target("offline workload, output tokens/s", engine.get("output_tokens_per_s"), 20_000, True, "tok/s",
               "12_throughput_cuda"),
        Target("vs transformers.generate, same run", (thr or {}).get("speedup_vs_transformers"), 200, True, "x",
               "12_throughput_cuda"),
        Target("batch-1 decode", graphs.get("decode_ms_per_token"), 0.6, False, "ms/token",
               "12_latency_cuda: cuda_graphs"),
        Target("TTFT, 1k-token prompt", graphs.get("ttft_ms"), 15.0, False, "ms", "12_latency_cuda: cuda_graphs"),
    ]
    prefill = [r for r in _rows(attn, "prefill") if r["tokens"] in PREFILL_TOKENS and r.get("mma_async_vs_sdpa")]
    worst = min(prefill, key=lambda r: r["mma_async_vs_sdpa"], default=None)
    out.append(Target(
        "own flash prefill vs SDPA flash, 4k-16k tokens (the slowest size)",
        worst and worst["mma_async_vs_sdpa"], 0.5, True, "x SDPA's speed", "07_attention: mma_async_vs_sdpa",
        ", ".join(f"{r['tokens']}: {r['mma_async_vs_sdpa']:.2f}x" for r in prefill)))
    runs = (host or {}).get("runs", {})
    step = runs.get("targets", {}).get("cpu_ms_per_step", {}).get("host", {}).get("median")
    batch = runs.get("targets", {}).get("workload", {}).get("batch")
    out.append(Target("host time per decode step, batch 256 (tiny model, CPU, forward replayed)", step, 1.0, False,
                      "ms", "17_host_overhead_cpu: runs.targets",
                      "" if batch in (None, 256) else f"measured at batch {batch}"))
    peak = (norms or {}).get("meta", {}).get("hbm_peak_gbps")
    rows = _rows(norms, "results")
    for kernel in NORMS:
        big = [r for r in rows if r["kernel"] == kernel and r["tokens"] == NORM_HBM_TOKENS]
        frac = big[0]["default_gbps"] / peak if big and peak else None
        out.append(Target(f"{kernel} at {NORM_HBM_TOKENS} tokens, share of the copy bandwidth", frac, 0.7, True,
                          "of HBM", "17_norm_variants_cuda: default_gbps / meta.hbm_peak_gbps"))
    paired = [r for r in rows if r["kernel"] in NORMS and r.get("default_us") and r.get("compile_us")]
    slower = [r for r in paired if r["default_us"] >= r["compile_us"]]
    out.append(Target(
        "norms faster than torch.compile, (norm, size) pairs", (len(paired) - len(slower)) if paired else None,
        len(paired) or 1, True, "pairs", "17_norm_variants_cuda: default_us < compile_us",
        "slower at " + ", ".join(f"{r['kernel']} {r['tokens']} ({r['default_us']:.2f} vs {r['compile_us']:.2f} us)"
                                 for r in slower) if slower else ""))
    decode = [r for r in _rows(paged, "decode")
              if r["batch"] >= DECODE_MIN_BATCH and r["context"] >= DECODE_MIN_CONTEXT and r.get("warp_floor_frac")]
    low = min(decode, key=lambda r: r["warp_floor_frac"], default=None)
    out.append(Target(
        f"paged decode, batch >= {DECODE_MIN_BATCH} x context >= {DECODE_MIN_CONTEXT} (the lowest case)",
        low and low["warp_floor_frac"], 0.7, True, "of the floor", "08_paged_attention: warp_floor_frac",
        low and f"lowest at batch {low['batch']} x {low['context']}"))
    return out


def provenance(folder: Path) -> dict[str, dict]:
    """Each part file's commit, GPU and date (the table's figures count as one run only if they agree)."""
    found = {}
    for _, names in PARTS.values():
        for name in names:
            data = _load(folder, name)
            if data is not None:
                m = data["meta"]
                found[name] = {"commit": m.get("commit"), "gpu": m.get("gpu"), "date": m.get("date"),
                               "command": m.get("command")}
    return found


def breakdown(folder: Path) -> dict | None:
    """The batch-1 step and what it saves without each kind of kernel (ms/token), from the knockout part."""
    ko = _load(folder, "17_knockout_cuda")
    if ko is None:
        return None
    return {"step_ms": ko["knockouts"]["none"]["decode_ms_per_token"],
            "without_layers_ms": ko["knockouts"].get("layers", {}).get("decode_ms_per_token"),
            "saved_ms": ko["saved_ms_per_token"]}


def summarize(folder: Path) -> dict:
    table = targets(folder)
    files = provenance(folder)
    commits = {f["commit"] for f in files.values()}
    gpus = {f["gpu"] for f in files.values() if f["gpu"]}  # the host part runs on the CPU (no GPU named)
    return {"targets": [{**asdict(t), "status": t.status} for t in table],
            "met": sum(t.status == "met" for t in table), "missed": sum(t.status == "missed" for t in table),
            "missing": sum(t.status == "missing" for t in table), "parts": files,
            "one_run": len(commits) == 1 and len(gpus) <= 1,
            "commits": sorted(c or "unknown" for c in commits), "gpus": sorted(gpus),
            "batch1_breakdown": breakdown(folder)}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _stamp(folder: Path, names: list[str], commit: str | None) -> None:
    """Record the commit in each file a part wrote (the benchmarks do not know it)."""
    for name in names:
        path = folder / f"{name}.json"
        if path.exists() and commit:
            data = json.loads(path.read_text())
            data["meta"].setdefault("commit", commit)
            path.write_text(json.dumps(data, indent=1) + "\n")


def run_parts(parts: list[str], folder: Path, timeout: float | None, commit: str | None = None) -> dict[str, int]:
    """Each part's benchmark in its own process, one after another; returns each one's exit status."""
    commit, status = commit or _commit(), {}
    for part in parts:
        command, names = PARTS[part]
        argv = [sys.executable, "-m", *command, "--out", str(folder)]
        print(f"== {part}: {' '.join(['python', '-m', *command])}", flush=True)
        start = time.monotonic()
        try:
            status[part] = subprocess.run(argv, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status[part] = -1
        print(f"== {part}: exit {status[part]} after {time.monotonic() - start:.0f} s", flush=True)
        _stamp(folder, names, commit)
    return status


def print_table(summary: dict) -> None:
    for t in summary["targets"]:
        f = t["figure"]
        figure = "-" if f is None else f"{f:,.0f}" if abs(f) >= 100 else f"{f:.3g}"
        sign = ">=" if t["higher_is_better"] else "<="
        print(f"{t['status']:>7}  {t['measure']}: {figure} {t['unit']} (target {sign} {t['goal']:g})"
              + (f"  [{t['detail']}]" if t["detail"] else ""))
    b = summary.get("batch1_breakdown")
    if b:
        saved = ", ".join(f"{k} {v:.3f}" for k, v in sorted(b["saved_ms"].items(), key=lambda kv: -kv[1]))
        print(f"batch-1 step {b['step_ms']:.3f} ms, {b['without_layers_ms']:.3f} without any decoder layer; "
              f"saved without each kind (ms): {saved}")
    print(f"{summary['met']} met, {summary['missed']} missed, {summary['missing']} missing; "
          + ("one run" if summary["one_run"] else f"NOT one run: commits {summary['commits']}, GPUs {summary['gpus']}"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--out", type=Path, default=RESULTS / "targets", help="the folder every part writes into")
    p.add_argument("--summarize", type=Path, metavar="DIR", help="only the table, from the files in DIR")
    p.add_argument("--part-timeout", type=float, default=None, help="seconds before a part is stopped")
    p.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD, where there is a .git)")
    args = p.parse_args(argv)
    folder = args.summarize or args.out
    if args.summarize is None:
        import torch

        if not torch.cuda.is_available():
            print("bench.targets measures the GPU engine; this machine has no GPU "
                  "(--summarize DIR reads a folder written on one)", file=sys.stderr)
            return 2
        failed = {k: v for k, v in run_parts(args.parts, folder, args.part_timeout, args.commit).items() if v}
        if failed:
            print(f"parts that failed (exit status): {failed}", flush=True)
    summary = summarize(folder)
    print_table(summary)
    print(f"saved {save(NAME, summary, folder)}")
    summary["meta"] = json.loads((folder / f"{NAME}.json").read_text())["meta"]
    engine_plots.targets(summary).savefig(folder / f"{NAME}.png", dpi=100)
    print(f"saved {folder / f'{NAME}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
