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
  ``schedule`` (the whole step plan) -> ``Scheduler.plan``, checked plan by plan against the package's on
  seeded random workloads (:func:`check_schedule`, the notebook's check too);
* engine (phase 12): ``step`` -> ``LLMEngine.step``, checked by tracing the calls it makes on a recording engine;
* kernels (phases 03-05): ``rms_norm``, ``fused_add_rms_norm``, ``apply_rope``, ``silu_and_mul`` -> the model's
  layers, on a GPU only (on a CPU the model runs the PyTorch references: a kernel in the CUDA simulator would
  take minutes per token);
* kernels (phase 07): ``flash_attention`` -> every layer's prefill attention (``minivllm.model.paged_attention``),
  on a GPU only;
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
from types import SimpleNamespace

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
    "flash_attention": Component("07", "every layer's prefill attention", gpu_only=True),
    "store_kv": Component("08", "every layer's KV-cache store", gpu_only=True),
    "paged_attention": Component("08", "every layer's paged decode attention", gpu_only=True),
    "top_p_mask": Component("10", "the sampler's top-p"),
    "min_p_mask": Component("10", "the sampler's min-p"),
    "scan_stop_strings": Component("10", "every request's stop strings"),
    "select_victim": Component("11", "the scheduler's preemption policy"),
    "max_cached_tokens": Component("11", "the scheduler's prefix-cache admission"),
    "schedule": Component("11", "the scheduler's step plan (budget, chunks, admission, preemption)"),
    "step": Component("12", "the engine's step (schedule, execute, sample, postprocess)"),
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


def _check_flash_attention(fn, device) -> str:
    """The learner's prefill attention against the package's reference (SDPA per sequence) on packed batches:
    a 1-token prompt, earlier context (more keys than queries: the causal mask aligned to the end), GQA, a scale."""
    from kernels.flash_attention import flash_attention_ref

    g = torch.Generator().manual_seed(0)
    cases = ((torch.bfloat16, 16, 8, 128, [1, 700, 1536, 2048], [1, 700, 2000, 2048], None),
             (torch.float32, 4, 2, 64, [37, 300], [100, 300], 0.3)) if device.type == "cuda" else \
        ((torch.float32, 4, 2, 16, [5, 1], [9, 1], 0.3), (torch.bfloat16, 2, 1, 16, [6], [6], None))
    for dtype, q_heads, kv_heads, dim, q_lens, k_lens, scale in cases:
        q = torch.randn(sum(q_lens), q_heads, dim, generator=g).to(device, dtype)
        k, v = (torch.randn(sum(k_lens), kv_heads, dim, generator=g).to(device, dtype) for _ in range(2))
        cu_q, cu_k = (torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32) for lens in (q_lens, k_lens))
        want = flash_attention_ref(q, k, v, cu_q, cu_k, scale)
        got = fn(q, k, v, cu_q, cu_k, scale=scale)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: one rounding of the output apart
        if got.shape != want.shape or got.dtype != want.dtype or \
                not torch.allclose(got.float(), want.float(), atol=tol / 10, rtol=tol):
            return (f"differs from SDPA (kernels.flash_attention.flash_attention_ref) on queries {q_lens} over keys "
                    f"{k_lens}, {q_heads}/{kv_heads} heads x {dim}, {dtype}")
    return ""


# ----------------------------------------------------------------------------- schedule(): plan by plan
@dataclass(frozen=True, slots=True)
class Workload:
    """A scheduler workload: the knobs, and requests ``(arrival step, seq id, prompt, max_tokens)``.

    ``max_tokens`` None: the request ignores EOS and runs until the KV cache cannot hold it (``length``)."""

    block_size: int
    num_blocks: int
    budget: int
    max_num_seqs: int
    caching: bool
    requests: tuple[tuple[int, int, tuple[int, ...], int | None], ...]

    def __repr__(self) -> str:
        def runs(tokens):  # [7, 7, 7, 2] -> "[7]*3+[2]": short and exact
            out, i = [], 0
            while i < len(tokens):
                j = i
                while j < len(tokens) and tokens[j] == tokens[i]:
                    j += 1
                out.append(f"[{tokens[i]}]*{j - i}" if j - i > 1 else f"[{tokens[i]}]")
                i = j
            return "+".join(out)

        reqs = ", ".join(f"({a}, {i}, {runs(p)}, {m})" for a, i, p, m in self.requests)
        return (f"Workload(block_size={self.block_size}, num_blocks={self.num_blocks}, budget={self.budget}, "
                f"max_num_seqs={self.max_num_seqs}, caching={self.caching}, requests=[{reqs}])")

    def scheduler(self, plan: Callable | None = None):
        """A fresh :class:`~minivllm.scheduler.Scheduler` for this workload; ``plan(sched)`` replaces its policy."""
        from minivllm.cache import BlockAllocator
        from minivllm.scheduler import Scheduler, SchedulerConfig

        cls = Scheduler if plan is None else type("Yours", (Scheduler,), {"plan": lambda self: plan(self)})
        config = SchedulerConfig(self.budget, self.max_num_seqs, self.block_size, enable_prefix_caching=self.caching)
        return cls(config, BlockAllocator(self.num_blocks), eos_token_ids=[WORKLOAD_EOS])

    def sequences(self) -> list[tuple[int, object]]:
        """Fresh ``(arrival step, Sequence)`` pairs; ``arrival`` follows the list (several may arrive in one step)."""
        from minivllm.sampling_params import SamplingParams
        from minivllm.sequence import Sequence

        order = sorted(range(len(self.requests)), key=lambda k: self.requests[k][0])
        return [(self.requests[k][0], Sequence(self.requests[k][1], list(self.requests[k][2]),
                                               SamplingParams(max_tokens=self.requests[k][3],
                                                              ignore_eos=self.requests[k][3] is None), arrival=rank))
                for rank, k in enumerate(order)]


WORKLOAD_EOS = 0


def workload_token(seq) -> int:
    """The "sampled" token: a function of the sequence alone (so both schedulers get the same), EOS every few."""
    return (seq.seq_id * 7 + seq.num_tokens * 3) % 11


def random_workload(seed: int, *, pressure: bool = True, caching: bool | None = None) -> Workload:
    """Seeded random requests with ties: several arrive in the same step, prompts of equal lengths, seq ids in
    another order than arrivals, shared prefixes and repeated prompts (prefix-cache hits), a small budget
    (chunked prefill) and, with ``pressure``, a KV pool so small that sequences are preempted."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4])
    max_num_seqs = rng.randint(2, 4)
    budget = rng.randint(max_num_seqs, 6 * bs)
    caching = rng.random() < 0.7 if caching is None else caching
    prefixes = [[10 + k] * rng.choice([bs, 2 * bs, 2 * bs + 1, 3 * bs]) for k in range(2)]
    n = rng.randint(3, 7)
    ids = rng.sample(range(n), n)
    requests, prompts = [], []
    for k in range(n):
        if prompts and rng.random() < 0.2:
            prompt = list(rng.choice(prompts))  # the same prompt again: all of it cached but its last token
        else:
            prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [20 + k] * rng.choice([1, 3, bs + 1, 2 * bs])
        prompts.append(prompt)
        max_tokens = None if (pressure and rng.random() < 0.08) else rng.choice([1, 2, 5, 9])
        requests.append((rng.randint(0, 6), ids[k], tuple(prompt), max_tokens))
    need = max(len(p) + (m - 1 if m else 0) for _, _, p, m in requests)
    num_blocks = -(-need // bs) + (rng.randint(0, 3) if pressure else 200)
    return Workload(bs, num_blocks, budget, max_num_seqs, caching, tuple(requests))


def _step_mismatch(step: int, ref, mine, a, b, before: dict[int, str]) -> str:
    """What differs between the package's step ``a`` and the learner's ``b`` (after both were planned)."""
    def ids(xs):
        return "[" + ", ".join(f"seq {i}" for i in xs) + "]" if xs else "nobody"

    if a.preempted != b.preempted:
        return f"step {step}, preemption: the package preempts {ids(a.preempted)}, yours {ids(b.preempted)}"
    if a.finished != b.finished:
        return (f"step {step}, finishing a sequence the cache cannot hold even alone: the package finishes "
                f"{ids(a.finished)} ('length'), yours {ids(b.finished)}")
    want = {e.seq.seq_id: (e.start, e.num_new_tokens) for e in a.scheduled}
    got = {e.seq.seq_id: (e.start, e.num_new_tokens) for e in b.scheduled}
    for i in [*want, *(i for i in got if i not in want)]:
        if want.get(i) != got.get(i):
            op = {"waiting": "admission", "decode": "decode", "prefill": "prefill chunk"}.get(before.get(i), "a step")

            def says(x):
                if x is None:
                    return "nothing"
                cached = f", {x[0]} cached" if op == "admission" and x[0] else ""
                return f"{x[1]} token{'s' * (x[1] != 1)} from position {x[0]}{cached}"
            return f"step {step}, {op} of seq {i}: the package computes {says(want.get(i))}, yours {says(got.get(i))}"
    for e, f in zip(a.scheduled, b.scheduled):
        if e.seq.block_table != f.seq.block_table:
            return (f"step {step}, blocks of seq {e.seq.seq_id}: the package's table is {e.seq.block_table}, yours "
                    f"{f.seq.block_table} (grow every planned token; nothing else)")
    for name in ("running", "waiting"):
        x, y = ([s.seq_id for s in getattr(s_, name)] for s_ in (ref, mine))
        if x != y:
            return f"step {step}, the {name} queue after planning: the package's {x} (by arrival), yours {y}"
    if ref.num_blocks_used != mine.num_blocks_used:
        return (f"step {step}, KV blocks in use after planning: the package {ref.num_blocks_used}, yours "
                f"{mine.num_blocks_used} (a refused admission releases its prefix match)")
    return ""


def schedule_mismatch(plan: Callable, workload: Workload, max_steps: int = 2000, trace: Callable | None = None) -> str:
    """Run the package's scheduler and one whose policy is ``plan(sched)`` side by side on identical copies of
    ``workload``, step by step; the first difference, in words ("" if every plan matched).

    Each step both get the same arrivals, are planned, compared (who computes how many tokens from where,
    who is preempted or finished, block tables, queues), then both get the same sampled tokens."""
    ref, mine = workload.scheduler(), workload.scheduler(plan)
    pending = [(x, y) for x, y in zip(workload.sequences(), workload.sequences())]
    for step in range(max_steps):
        while pending and pending[0][0][0] <= step:
            (_, s), (_, t) = pending.pop(0)
            ref.add(s)
            mine.add(t)
        if not ref.has_unfinished():
            if not pending:
                return f"after step {step}: yours still has unfinished sequences" if mine.has_unfinished() else ""
            continue
        before = {s.seq_id: "waiting" for s in ref.waiting}
        before |= {s.seq_id: "prefill" if s.is_prefill else "decode" for s in ref.running}
        a = ref.schedule()
        try:
            b = mine.schedule()
        except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything: say where
            return f"step {step}: your schedule raised {type(e).__name__}: {e}"
        if trace is not None:
            trace(step, a, b)
        problem = _step_mismatch(step, ref, mine, a, b, before)
        if problem:
            return problem
        tokens = [workload_token(s) for s in a.sampled_seqs]
        ref.postprocess(a, tokens)
        mine.postprocess(b, tokens)
    return f"the workload did not finish in {max_steps} steps"


def shrink(plan: Callable, workload: Workload) -> tuple[Workload, str]:
    """A smaller workload that still fails: drop requests one at a time while the mismatch stays."""
    problem = schedule_mismatch(plan, workload)
    changed = True
    while changed and len(workload.requests) > 1:
        changed = False
        for k in range(len(workload.requests)):
            smaller = Workload(*[getattr(workload, f) for f in ("block_size", "num_blocks", "budget", "max_num_seqs",
                                                                "caching")], workload.requests[:k] + workload.requests[k + 1:])
            p = schedule_mismatch(plan, smaller)
            if p:
                workload, problem, changed = smaller, p, True
                break
    return workload, problem


def check_schedule(plan: Callable, seeds, **kwargs) -> str:
    """``plan`` against the package on ``random_workload(seed, **kwargs)`` for each seed; the first failure,
    shrunk to a few requests, with its reproduction ("" if all match)."""
    for seed in seeds:
        workload = random_workload(seed, **kwargs)
        if schedule_mismatch(plan, workload):
            workload, problem = shrink(plan, workload)
            return f"{problem}\n   reproduce: {workload!r}"
    return ""


def _check_schedule(fn, device) -> str:
    return check_schedule(fn, range(40)).split("\n")[0]


# ----------------------------------------------------------------------------- step(): the calls it makes
class _Recorder:
    """A stand-in engine whose components record every call and answer with fresh tokens (no model)."""

    learner_step = None  # the package's LLMEngine.step runs its own moves on it
    overlap = False  # its plain loop (the five moves), not the overlapped one, with nothing in flight
    loop = SimpleNamespace(in_flight=False)

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        rec = self

        class Part:
            def __init__(self, name: str) -> None:
                self._name = name

            def __getattr__(self, attr):
                if attr == "last_step_graph":
                    return "graph?"

                def call(*args, **kwargs):
                    result = f"{self._name}.{attr}#{len(rec.calls)}"
                    rec.calls.append((f"{self._name}.{attr}", args, tuple(sorted(kwargs.items())), result))
                    return result
                return call

        self.scheduler, self.runner, self.processor = Part("scheduler"), Part("runner"), Part("processor")

    def sample(self, *args, **kwargs):
        result = Sampled(f"engine.sample#{len(self.calls)}.token_ids")
        self.calls.append(("engine.sample", args, tuple(sorted(kwargs.items())), result))
        return result


@dataclass(frozen=True)
class Sampled:  # what the recording engine's sample returns: token ids the step must hand to postprocess
    token_ids: str


def _step_calls(step: Callable) -> tuple[list[tuple], object]:
    """The calls ``step`` makes on a recording engine; the step's start time is compared by type (a float)."""
    engine = _Recorder()
    result = step(engine)
    calls = []
    for name, args, kwargs, _ in engine.calls:
        if name == "processor.process" and len(args) >= 3:
            args = (*args[:2], f"<{type(args[2]).__name__}>", *args[3:])
        calls.append((name, args, kwargs))
    return calls, result


def _args(args: tuple, kwargs: tuple) -> str:
    def show(x):
        if isinstance(x, Sampled):
            return "<what engine.sample returned>"
        if isinstance(x, str) and "#" in x:
            name, rest = x.split("#")
            return f"<what {name} returned>{rest.lstrip('0123456789')}"
        return repr(x)
    return "(" + ", ".join([*map(show, args), *(f"{k}={show(v)}" for k, v in kwargs)]) + ")"


def _check_step(fn, device) -> str:
    """The learner's step makes the package's calls, in its order, with its arguments, and returns its result."""
    from minivllm.engine import LLMEngine

    want, want_result = _step_calls(LLMEngine.step)
    got, got_result = _step_calls(fn)
    for i, (w, g) in enumerate(zip(want, got)):
        if w[0] != g[0]:
            return f"call {i + 1}: the package calls {w[0]}, yours {g[0]}"
        if w != g:
            return f"call {i + 1} ({w[0]}): the package passes {_args(*w[1:])}, yours {_args(*g[1:])}"
    if len(got) != len(want):
        return f"the package makes {len(want)} calls ({', '.join(c[0] for c in want)}), yours {len(got)}"
    if got_result != want_result:
        return "it does not return what processor.process returned"
    return ""


def _checks() -> dict[str, Callable]:
    from minivllm.sampling.filters import apply_min_p, apply_top_p

    return {"top_p_mask": _mask_check(apply_top_p, ([0.5, 0.9, 0.05, 0.75, 1.0], [0.3, 0.6, 0.95, 0.99, 0.2])),
            "min_p_mask": _mask_check(apply_min_p, ([0.0, 0.1, 0.3, 0.02, 1.0], [0.05, 0.5, 0.01, 0.2, 0.0])),
            "scan_stop_strings": _check_scan, "select_victim": _check_select_victim,
            "max_cached_tokens": _check_max_cached, "schedule": _check_schedule, "step": _check_step, "store_kv": _check_store_kv,
            "paged_attention": _check_paged_attention, "flash_attention": _check_flash_attention,
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
    plan = parts.functions.get("schedule")
    if victim is None and cached is None and plan is None:
        return Scheduler

    class LearnerScheduler(Scheduler):
        def plan(self):
            return plan(self) if plan else super().plan()

        def select_victim(self):
            return victim(list(self.running)) if victim else super().select_victim()

        def max_cached_tokens(self, seq):
            return cached(seq.num_tokens, self.config.block_size) if cached else super().max_cached_tokens(seq)

    return LearnerScheduler


def install_kernels(parts: LearnerParts) -> None:
    """The model's layers call the learner's kernels (on CUDA tensors) where they passed."""
    from minivllm.model import layers

    layers.LEARNER_KERNELS.clear()
    for name in ("rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul", "flash_attention", "store_kv",
                 "paged_attention"):
        if name in parts.functions:
            layers.LEARNER_KERNELS[name] = parts.functions[name]
