"""Phase 07's learner component: the learner's flash-attention prefill kernel, checked at load and used in prefill.

* ``learner.CHECKS["flash_attention"]`` accepts the package's own launcher (``kernels.flash_attention``, run in
  the simulator on the CPU cases) and rejects wrong versions written here: no causal mask, a causal mask aligned to
  the start instead of the end, GQA mapped as ``h % n_kv``.
* ``minivllm.model.paged_attention.prefill`` hands a learner's kernel the step's prefill sequences packed, each
  with its whole context (this step's k/v for a fresh prompt, the paged cache for a cached prefix), in one call,
  and gives what the SDPA path gives (the hook is for CUDA tensors; the test routes CPU tensors through it).
* the solution notebook's kernel (taken from ``solutions/07_flash_attention.ipynb``) passes the notebook's check and,
  saved to a workspace, the load-time check; each of a set of typical mistakes (a mutation of the solution) fails
  the notebook's check; it compiles for sm_90 (the simulator does no type inference); on a GPU the learner's engine
  with it serves the package's tokens.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import flash_attention as fa
from kernels._env import simulator_enabled
from minivllm import learner

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
needs_sim = pytest.mark.skipif(not simulator_enabled(), reason="runs the package's kernel in numba's CUDA simulator")


def _sdpa(q, k, v, cu_q, cu_k, scale, *, aligned_to_end=True, causal=True, gqa=lambda h, n_q, n_kv: h // (n_q // n_kv)):
    """Per sequence and head: SDPA with a mask and a head mapping of our choosing (the wrong versions vary them)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    n_q, n_kv = q.shape[1], k.shape[1]
    for b in range(len(cq) - 1):
        q_len, k_len = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        i, j = torch.arange(q_len)[:, None], torch.arange(k_len)[None, :]
        mask = (j <= i + (k_len - q_len) if aligned_to_end else j <= i) if causal else None
        for h in range(n_q):
            qs = q[cq[b]:cq[b + 1], h].float()
            ks, vs = (t[ck[b]:ck[b + 1], gqa(h, n_q, n_kv)].float() for t in (k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
            out[cq[b]:cq[b + 1], h] = o.to(q.dtype)
    return out


WRONG = {
    "no causal mask": lambda q, k, v, cu_q, cu_k, scale=None: _sdpa(q, k, v, cu_q, cu_k, scale, causal=False),
    "causal aligned to the start": lambda q, k, v, cu_q, cu_k, scale=None: _sdpa(q, k, v, cu_q, cu_k, scale,
                                                                                 aligned_to_end=False),
    "GQA as h % n_kv": lambda q, k, v, cu_q, cu_k, scale=None: _sdpa(q, k, v, cu_q, cu_k, scale,
                                                                     gqa=lambda h, n_q, n_kv: h % n_kv),
}


def test_the_check_accepts_a_correct_version_written_here():
    assert learner.CHECKS["flash_attention"](lambda *a, scale=None: _sdpa(*a, scale), CPU) == ""


@needs_sim
def test_the_check_accepts_the_packages_kernel():
    assert learner.CHECKS["flash_attention"](fa.flash_attention, CPU) == ""


@pytest.mark.parametrize("name", WRONG)
def test_the_check_rejects_a_wrong_version(name):
    problem = learner.CHECKS["flash_attention"](WRONG[name], CPU)
    assert "differs from SDPA" in problem and "heads" in problem, problem


def test_the_component_is_a_phase_07_gpu_kernel():
    comp = learner.COMPONENTS["flash_attention"]
    assert comp.phase == "07" and comp.gpu_only and "prefill" in comp.plugs_into


# ----------------------------------------------------------------------------- the engine's prefill hook
def test_prefill_calls_the_learners_kernel_once_with_each_whole_context(monkeypatch):
    from minivllm.cache.kv_cache import PagedKVCache
    from minivllm.model import paged_attention as pa

    torch.manual_seed(0)
    block_size, kv_heads, q_heads, dim = 4, 2, 4, 8
    pool = torch.randn(12, 2, block_size, kv_heads, dim)  # random: a block read by mistake changes the result
    cache = PagedKVCache([pool])
    # a decode row first (the block tables of prefill sequences start after it), then a fresh 5-token prompt, then
    # a prompt of 10 whose first 7 tokens are cached: its 3 new tokens' K/V are already stored in the pool
    tables = torch.tensor([[0, 1, -1], [5, 2, -1], [9, 3, 7]], dtype=torch.int32)
    new_k, new_v = torch.randn(8, kv_heads, dim), torch.randn(8, kv_heads, dim)  # this step's 5 + 3 tokens
    pages = pool[tables[2].long()]  # the cached prompt's blocks
    ctx_k, ctx_v = pages[:, 0].flatten(0, 1)[:10], pages[:, 1].flatten(0, 1)[:10]
    new_k[5:], new_v[5:] = ctx_k[7:], ctx_v[7:]
    q = torch.randn(8, q_heads, dim)

    def meta(backend):
        return pa.PagedAttentionMetadata(cache, torch.zeros(9, dtype=torch.long), tables,
                                         torch.tensor([3, 5, 10], dtype=torch.int32), num_decodes=1,
                                         max_context_len=10, query_lens=[5, 3], prefill_context_lens=[5, 10],
                                         backend=backend)

    calls = []

    def learners(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None):
        calls.append((q.shape, k.clone(), v.clone(), cu_seqlens_q.tolist(), cu_seqlens_k.tolist()))
        assert k.is_contiguous() and v.is_contiguous() and cu_seqlens_q.dtype == torch.int32
        return fa.flash_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)

    monkeypatch.setattr(pa, "_gpu", lambda m, x: m.backend != "torch")  # route CPU tensors as a GPU call
    monkeypatch.setitem(pa.LEARNER_KERNELS, "flash_attention", learners)
    want = pa.prefill(q, new_k, new_v, 0, meta("torch"))  # the SDPA path
    got = pa.prefill(q, new_k, new_v, 0, meta("auto"))
    assert len(calls) == 1
    shape, k, v, cu_q, cu_k = calls[0]
    assert shape == q.shape and cu_q == [0, 5, 8] and cu_k == [0, 5, 15]
    torch.testing.assert_close(k, torch.cat([new_k[:5], ctx_k]))  # fresh prompt: this step's k; else the cache
    torch.testing.assert_close(v, torch.cat([new_v[:5], ctx_v]))
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- the solution notebook's kernel
def _solution_cell(marker: str) -> str:
    cells = json.loads((ROOT / "solutions" / "07_flash_attention.ipynb").read_text())["cells"]
    for cell in cells:
        code = "".join(cell["source"])
        if cell["cell_type"] == "code" and marker in code:
            return code
    raise AssertionError(f"no cell with {marker!r} in solutions/07_flash_attention.ipynb")


HEADER = """import math
from types import SimpleNamespace

import numba
import torch
from numba import cuda

from kernels._launch import cdiv, launch, resolve_backend

env = SimpleNamespace(on_gpu=torch.cuda.is_available())
device = "cuda" if env.on_gpu else "cpu"


def cu_seqlens(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


"""


def _load(tmp_path: Path, source: str, name: str):
    """Import ``source`` as module ``name`` from a file (so ``inspect`` finds the kernel's source)."""
    (tmp_path / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        __import__(name)
    finally:
        sys.path.remove(str(tmp_path))
    return sys.modules[name]


def _solution_source(replace: tuple[str, str] | None = None) -> str:
    """The notebook's kernel + launcher cell and its check cases, as a module (optionally with one mistake in)."""
    kernel = _solution_cell("def my_flash_attention_kernel(")
    if replace is not None:
        assert kernel.count(replace[0]) == 1, replace[0]
        kernel = kernel.replace(*replace)
    cases = _solution_cell("def attention_case(").split("flash_attention = course.check")[0]
    return HEADER + kernel + "\n\n\n" + cases + "\n"


def _notebook_check(module) -> None:
    """The notebook's two checks, as its cell runs them."""
    from minivllm import course

    course.check(module.my_flash_attention, fa.flash_attention_ref, module.fp32_cases, name="fp32",
                 uses=[module.my_flash_attention_kernel], atol=2e-5, rtol=2e-5)
    course.check(module.my_flash_attention, fa.flash_attention_ref, module.bf16_cases, name="bf16",
                 uses=[module.my_flash_attention_kernel], atol=1e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def solution(tmp_path_factory):
    return _load(tmp_path_factory.mktemp("solution"), _solution_source(), "answer_07")


@needs_sim
def test_the_solution_passes_the_notebooks_check_and_the_load_time_check(solution, tmp_path, monkeypatch):
    from minivllm.course import workspace as ws

    _notebook_check(solution)
    monkeypatch.setenv("MINIVLLM_WORKSPACE", str(tmp_path))
    assert ws.record("flash_attention", solution.my_flash_attention) == tmp_path / "flash_attention.py"
    assert learner.CHECKS["flash_attention"](learner._load(tmp_path / "flash_attention.py"), CPU) == ""
    report = {n: (w, why) for n, w, why in learner.load_parts(tmp_path, "cpu").report}
    assert report["flash_attention"][0] == "package" and "on a GPU" in report["flash_attention"][1]


MISTAKES = {  # a typical mistake -> (what the solution says, what the mistaken kernel says)
    "GQA as h % n_kv": ("kv_head = head // (q.shape[1] // k.shape[1])", "kv_head = head % k.shape[1]"),
    "causal aligned to the start": ("offset = k_len - q_len  #", "offset = 0  #"),
    "no running max": ("alpha = math.exp(m - m_new)",
                       "m_new = numba.float32(0.0)\n            alpha = numba.float32(1.0)"),
    "l not rescaled": ("l *= alpha\n", "l *= 1.0\n"),
    "keys indexed with the query offset": ("k[k_start + tile_start + j, kv_head, d]",
                                           "k[q_start + tile_start + j, kv_head, d]"),
    "tile loop bound per row (barriers mismatched)": ("for tile_start in range(0, block_limit, TILE_N)",
                                                      "for tile_start in range(0, limit, TILE_N)"),
}


@needs_sim
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN from the overflowing softmax, in the simulator
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_notebooks_check_fails_a_typical_mistake(mistake, tmp_path):
    from minivllm.course.checks import CheckFailed

    name = "mistake_07_" + "".join(c if c.isalnum() else "_" for c in mistake)
    module = _load(tmp_path, _solution_source(MISTAKES[mistake]), name)
    with pytest.raises(CheckFailed):
        _notebook_check(module)


@pytest.mark.gpu
def test_the_learners_kernel_serves_the_packages_tokens_on_a_gpu(solution, tmp_path, monkeypatch):
    """fp32 on the GPU: the learner's kernel in every prefill (fresh prompts, a prefix-cache hit, chunks of a long
    prompt) gives the package's greedy tokens; the engine called it."""
    from minivllm.course import workspace as ws
    from minivllm.llm import LLM
    from minivllm.model import layers
    from minivllm.sampling_params import SamplingParams

    monkeypatch.setenv("MINIVLLM_WORKSPACE", str(tmp_path))
    ws.record("flash_attention", solution.my_flash_attention)
    whose = {n: (w, why) for n, w, why in learner.load_parts(tmp_path, "cuda").report}
    assert whose["flash_attention"][0] == "yours", whose
    long = "Tell me everything you know about the history of Paris, its rivers and bridges. " * 6
    questions = ("What is the capital of France?", "Name three colours.", long)
    prompts = [[{"role": "user", "content": q}] for q in questions]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    small = dict(dtype="float32", num_kv_blocks=512, cuda_graph_max_batch=8, max_num_batched_tokens=64)
    runs = []
    for engine in ("yours", "package"):
        llm = LLM(learner=str(tmp_path), **small) if engine == "yours" else LLM(**small)
        calls = []
        if engine == "yours":
            fn = layers.LEARNER_KERNELS["flash_attention"]
            monkeypatch.setitem(layers.LEARNER_KERNELS, "flash_attention",
                                lambda *a, **kw: calls.append((a[3].tolist(), a[4].tolist())) or fn(*a, **kw))
        # fresh prompts (the long one in chunks: a 64-token budget), then the first again: a prefix-cache hit
        outs = llm.chat(prompts, greedy, use_tqdm=False) + llm.chat(prompts[:1], greedy, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
        if engine == "yours":
            assert calls, "the engine's prefill never called the learner's kernel"
            lens = [(q1 - q0, k1 - k0) for cu_q, cu_k in calls
                    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])]
            assert any(k > q for q, k in lens), lens  # earlier context: a later chunk, the prefix-cache hit
            assert lens[-1][0] < lens[-1][1] == lens[0][1], lens  # the hit: the first prompt's last tokens only
        del llm
    assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- the solution compiles for a GPU
COMPILE = textwrap.dedent('''
    import math, sys
    import numba
    from numba import cuda
    import kernels._ptx as ptx

    namespace = {"math": math, "numba": numba, "cuda": cuda, "MAX_HEAD_DIM": 128, "ROWS": 64, "TILE_N": 32}
    exec(sys.stdin.read(), namespace)
    ptx._pretend_device((9, 0))
    for t in ("float32", "bfloat16"):
        sig = (f"void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], int32[::1], int32[::1], "
               "float32)")
        for cc, ptx_bytes, cubin, err in ptx._Builder(((9, 0),)).build(namespace["my_flash_attention_kernel"], sig):
            print(t, "ok" if err is None else "FAIL " + err)
''')


def _solution_kernel_source() -> str:
    """The ``@cuda.jit`` function alone: no torch, so the compiler subprocess starts in a second or two."""
    code = _solution_cell("def my_flash_attention_kernel(")
    node = next(n for n in ast.parse(code).body
                if isinstance(n, ast.FunctionDef) and n.name == "my_flash_attention_kernel")
    return "\n".join(code.splitlines()[node.decorator_list[0].lineno - 1:node.end_lineno]) + "\n"


def test_the_solution_kernel_compiles_for_sm_90():
    source = _solution_kernel_source()
    assert source.startswith("@cuda.jit") and "### BEGIN SOLUTION" in source
    proc = subprocess.run([sys.executable, "-c", COMPILE], input=source, env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.split() == ["float32", "ok", "bfloat16", "ok"], proc.stdout[-3000:]
