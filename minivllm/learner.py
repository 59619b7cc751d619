"""The learner's engine: the components a learner wrote in the notebooks, plugged into the real engine.

Each notebook exercise that passes its check is saved in the learner's workspace (``notebooks/workspace/``,
written by ``minivllm.course.workspace``). :func:`load_parts` reads it back: every component is loaded in
a fresh module, checked once more against the package's version on a few inputs, and used where it passed;
a missing, stale (written for another API version) or failing one falls back to the package, with a line
saying why. :attr:`LearnerParts.report` says which is whose (the server shows it on ``/health`` and the chat page).

Where each component plugs in:

* sampler (phase 10): ``top_p_mask``, ``min_p_mask`` -> the engine's ``Sampler``; ``scan_stop_strings`` -> the
  stop-string checker of every request;
* scheduler (phase 11): ``select_victim``, ``max_cached_tokens`` -> the engine's ``Scheduler`` policy hooks;
* kernels (phases 03-05): ``rms_norm``, ``fused_add_rms_norm``, ``apply_rope``, ``silu_and_mul`` -> the model's
  layers, on a GPU only (on a CPU the model runs the PyTorch references: a kernel in the CUDA simulator would
  take minutes per token);
* kernels (phase 08): ``store_kv``, ``paged_attention`` -> every layer's KV store and decode attention
  (``minivllm.model.paged_attention``), on a GPU only.

Left out: components that are classes (the radix tree of phase 09).
"""

import importlib.util
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

API_VERSION = 1


@dataclass(frozen=True, slots=True)
class Component:
    phase: str
    plugs_into: str
    gpu_only: bool = False


COMPONENTS = {
    "rms_norm": Component("03", "the model's RMSNorm", gpu_only=True),
    "fused_add_rms_norm": Component("03", "the model's residual add + RMSNorm", gpu_only=True),
    "apply_rope": Component("04", "the model's RoPE", gpu_only=True),
    "silu_and_mul": Component("05", "the model's SwiGLU", gpu_only=True),
    "store_kv": Component("08", "every layer's KV-cache store", gpu_only=True),
    "paged_attention": Component("08", "every layer's paged decode attention", gpu_only=True),
    "top_p_mask": Component("10", "the sampler's top-p"),
    "min_p_mask": Component("10", "the sampler's min-p"),
    "scan_stop_strings": Component("10", "every request's stop strings"),
    "select_victim": Component("11", "the scheduler's preemption policy"),
    "max_cached_tokens": Component("11", "the scheduler's prefix-cache admission"),
}


@dataclass(slots=True)
class LearnerParts:
    functions: dict[str, Callable] = field(default_factory=dict)  # component -> the learner's function
    report: list[tuple[str, str, str]] = field(default_factory=list)  # (component, "yours" / "package", why)

    def lines(self) -> list[str]:
        return [f"{'✅ yours  ' if whose == 'yours' else '📦 package'} {name:20s} {why}" for name, whose, why in self.report]


def default_workspace() -> Path:
    """Where the notebooks save: ``$MINIVLLM_WORKSPACE``; else ``workspace/`` here (a notebook's folder);
    else ``notebooks/workspace`` of the checkout we run from (``minivllm serve --learner`` at the repo root)."""
    if os.environ.get("MINIVLLM_WORKSPACE"):
        return Path(os.environ["MINIVLLM_WORKSPACE"])
    if (Path.cwd() / "workspace").is_dir():
        return Path.cwd() / "workspace"
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / "notebooks" / "workspace").is_dir():
            return base / "notebooks" / "workspace"
    return Path.cwd() / "notebooks" / "workspace"


def load_parts(workspace: str | Path | None = None, device: torch.device | str = "cpu") -> LearnerParts:
    """Every component of the workspace that loads and passes its check, and a report line for each."""
    folder = Path(workspace) if workspace is not None else default_workspace()
    device = torch.device(device)
    parts = LearnerParts()
    for name, comp in COMPONENTS.items():
        path = folder / f"{name}.py"
        if not path.is_file():
            parts.report.append((name, "package", f"not written yet (phase {comp.phase})"))
            continue
        if comp.gpu_only and device.type != "cuda":
            parts.report.append((name, "package", "yours runs on a GPU; on a CPU the model uses the PyTorch reference"))
            continue
        try:
            fn = _load(path)
            problem = CHECKS[name](fn, device)
        except Exception as e:  # noqa: BLE001 -- a learner's file may raise anything: fall back, say why
            problem = f"{type(e).__name__}: {e}"
        if problem:
            parts.report.append((name, "package", f"{path.name} fails its check ({problem[:160]})"))
        else:
            parts.functions[name] = fn
            parts.report.append((name, "yours", f"in {comp.plugs_into} ({path.name})"))
    return parts


def _load(path: Path) -> Callable:
    spec = importlib.util.spec_from_file_location(f"minivllm_learner_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if getattr(module, "API_VERSION", None) != API_VERSION:
        raise RuntimeError(f"stale: written for API version {getattr(module, 'API_VERSION', None)}, this package "
                           f"is {API_VERSION}: run its notebook again")
    return module.COMPONENT


# ----------------------------------------------------------------------------- the load-time checks
def _mask_check(reference: Callable, knobs: tuple[list[float], ...]) -> Callable:
    def check(fn, device) -> str:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(5, 300, generator=g) * 2.5
        logits[3] = (logits[3] * 2).round() / 2  # ties
        for knob in map(torch.tensor, knobs):
            want = reference(logits, knob) > -math.inf
            if not torch.equal(fn(logits, knob).bool(), want):
                return "a different mask than the package's on random logits"
        return ""
    return check


def _check_scan(fn, device) -> str:
    from minivllm.stop import scan_stop_strings

    cases = [("", "hello", ["lo"], False), ("he", "llo wor", ["lo w", "x"], True), ("abc", "de", ["cdef"], False),
             ("", "ab", [], False), ("x\n", "\nUser", ["\n\nUser"], False)]
    for case in cases:
        if tuple(fn(*case)) != tuple(scan_stop_strings(*case)):
            return f"scan{case!r} differs from the package's"
    return ""


def _check_select_victim(fn, device) -> str:
    from minivllm.sequence import Sequence

    rng = random.Random(0)
    pool = [Sequence(i, [1, 2]) for i in range(6)]
    for _ in range(5):
        running = rng.sample(pool, rng.randint(1, 6))
        if fn(list(running)) is not max(running, key=lambda s: s.arrival):
            return "it preempts another sequence than the package's policy (the newest)"
    return ""


def _check_max_cached(fn, device) -> str:
    for n, bs in ((1, 4), (4, 4), (5, 4), (9, 4), (32, 16), (33, 16)):
        if fn(n, bs) != (n - 1) // bs * bs:
            return f"max_cached_tokens({n}, {bs}) = {fn(n, bs)}, the package's scheduler serves {(n - 1) // bs * bs}"
    return ""


def _kernel_check(name: str) -> Callable:
    def check(fn, device) -> str:
        from minivllm.model import layers

        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(4, 64, device=device, generator=g)
        if name == "rms_norm":
            w = torch.rand(64, device=device, generator=g) + 0.5
            got, want = fn(x, w, 1e-6), layers.rms_norm(x, w, 1e-6)
        elif name == "fused_add_rms_norm":
            w, r = torch.rand(64, device=device, generator=g) + 0.5, torch.randn(4, 64, device=device, generator=g)
            got = fn(x.clone(), r.clone(), w, 1e-6)[0]
            want = layers.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-6)[0]
        elif name == "silu_and_mul":
            got, want = fn(x), layers.silu_and_mul(x)
        else:
            q, k = torch.randn(4, 2, 64, device=device, generator=g), torch.randn(4, 1, 64, device=device, generator=g)
            pos, table = torch.arange(4, device=device), layers.rope_cache(64, 16, 1e4, device)
            got = torch.cat([t.flatten() for t in fn(q.clone(), k.clone(), pos, table)])
            want = torch.cat([t.flatten() for t in layers.apply_rope(q.clone(), k.clone(), pos, table)])
        return "" if torch.allclose(got.float(), want.float(), atol=1e-4, rtol=1e-4) else "differs from the package's"
    return check


def _check_store_kv(fn, device) -> str:
    """The learner's store against the package's ``kernels.store_kv``: random K/V, slots in random order, some -1."""
    from kernels.store_kv import store_kv

    g = torch.Generator().manual_seed(0)
    shapes = ((torch.bfloat16, 40, 8, 128), (torch.float32, 7, 3, 64)) if device.type == "cuda" else \
        ((torch.float32, 6, 2, 16), (torch.bfloat16, 3, 1, 16))
    for dtype, tokens, heads, dim in shapes:
        key, value = (torch.randn(tokens, heads, dim, generator=g).to(device, dtype) for _ in range(2))
        cache = torch.randn(4, 2, 16, heads, dim, generator=g).to(device, dtype)
        slots = torch.randperm(64, generator=g)[:tokens]
        slots[::3] = -1  # padding rows: skipped
        slots = slots.to(device)
        want, got = cache.clone(), cache.clone()
        store_kv(key, value, want, slots)
        fn(key, value, got, slots)
        if not torch.equal(got, want):
            return f"a different cache than the package's store_kv ({tokens} tokens x {heads} heads x {dim}, {dtype})"
    return ""


def _check_paged_attention(fn, device) -> str:
    """The learner's decode attention against the package's (what the engine calls otherwise), with a
    ``max_context_len`` past the longest context as the engine's CUDA graphs pass it, shuffled blocks, GQA."""
    from kernels.paged_attention_warp import paged_attention_warp

    on_gpu = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    cases = ((torch.bfloat16, 16, 8, 128, [700, 1, 300, 1025], 1500), (torch.float32, 9, 3, 64, [17, 513], 600)) \
        if on_gpu else ((torch.float32, 4, 2, 16, [20, 3], 24), (torch.bfloat16, 2, 1, 16, [9], 16))
    for dtype, q_heads, kv_heads, dim, lens, max_len in cases:
        width = -(-max_len // 16)
        pool = torch.randn(len(lens) * width, 2, 16, kv_heads, dim, generator=g).to(device, dtype)
        tables = torch.randperm(len(lens) * width, generator=g).to(torch.int32).view(len(lens), width).to(device)
        context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        q = torch.randn(len(lens), q_heads, dim, generator=g).to(device, dtype)
        want = paged_attention_warp(q, pool, tables, context_lens, max_context_len=max_len,
                                    backend="auto" if on_gpu else "torch")
        got = fn(q, pool, tables, context_lens, max_context_len=max_len)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: one rounding of the output apart
        if got.shape != want.shape or not torch.allclose(got.float(), want.float(), atol=tol / 10, rtol=tol):
            return (f"differs from the package's paged attention (contexts {lens}, {q_heads}/{kv_heads} heads x {dim}, "
                    f"{dtype})")
    return ""


def _checks() -> dict[str, Callable]:
    from minivllm.sampling.filters import apply_min_p, apply_top_p

    return {"top_p_mask": _mask_check(apply_top_p, ([0.5, 0.9, 0.05, 0.75, 1.0], [0.3, 0.6, 0.95, 0.99, 0.2])),
            "min_p_mask": _mask_check(apply_min_p, ([0.0, 0.1, 0.3, 0.02, 1.0], [0.05, 0.5, 0.01, 0.2, 0.0])),
            "scan_stop_strings": _check_scan, "select_victim": _check_select_victim,
            "max_cached_tokens": _check_max_cached, "store_kv": _check_store_kv,
            "paged_attention": _check_paged_attention,
            **{k: _kernel_check(k) for k in ("rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul")}}


class _Checks(dict):
    def __missing__(self, key):
        self.update(_checks())
        return dict.__getitem__(self, key)


CHECKS = _Checks()


# ----------------------------------------------------------------------------- plugging them in
def sampler_class(parts: LearnerParts):
    """The engine's ``Sampler``, with the learner's top-p / min-p masks where they passed."""
    from minivllm.sampler import Sampler

    top_p, min_p = parts.functions.get("top_p_mask"), parts.functions.get("min_p_mask")
    if top_p is None and min_p is None:
        return Sampler

    class LearnerSampler(Sampler):
        def apply_top_p(self, logits, p):
            return logits.masked_fill(~top_p(logits, p).bool(), -math.inf) if top_p else super().apply_top_p(logits, p)

        def apply_min_p(self, logits, p):
            return logits.masked_fill(~min_p(logits, p).bool(), -math.inf) if min_p else super().apply_min_p(logits, p)

    return LearnerSampler


def stop_checker_class(parts: LearnerParts):
    from minivllm.stop import StopChecker

    scan = parts.functions.get("scan_stop_strings")
    if scan is None:
        return StopChecker
    return type("LearnerStopChecker", (StopChecker,), {"scan": staticmethod(scan)})


def scheduler_class(parts: LearnerParts):
    from minivllm.scheduler import Scheduler

    victim, cached = parts.functions.get("select_victim"), parts.functions.get("max_cached_tokens")
    if victim is None and cached is None:
        return Scheduler

    class LearnerScheduler(Scheduler):
        def select_victim(self):
            return victim(list(self.running)) if victim else super().select_victim()

        def max_cached_tokens(self, seq):
            return cached(seq.num_tokens, self.config.block_size) if cached else super().max_cached_tokens(seq)

    return LearnerScheduler


def install_kernels(parts: LearnerParts) -> None:
    """The model's layers call the learner's kernels (on CUDA tensors) where they passed."""
    from minivllm.model import layers

    layers.LEARNER_KERNELS.clear()
    for name in ("rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul", "store_kv", "paged_attention"):
        if name in parts.functions:
            layers.LEARNER_KERNELS[name] = parts.functions[name]
