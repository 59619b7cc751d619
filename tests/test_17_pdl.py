"""kernels._pdl: programmatic dependent launch. Every kernel launched with PDL allowed waits before it touches
another kernel's data; the instructions are emitted for sm_90 and newer only; on a GPU that has PDL, a chain of
dependent kernels and the engine give the same bits with it as without it."""

import gc
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels._launch as kl
from kernels import _pdl
from kernels import gemv as g

gpu = pytest.mark.gpu


def _engine_kernel_modules():
    """Import the modules whose kernels are marked (each marks at import: SIGNATURES builds them)."""
    from kernels import _rmsnorm_vec, paged_attention_warp, paged_decode_prep, qkv_prep  # noqa: F401

    return _pdl.MARKED


def test_every_marked_kernel_calls_pdl_wait():
    marked = _engine_kernel_modules()
    names = set()
    for dispatcher in marked:
        fn = getattr(dispatcher, "py_func", None) or dispatcher.fn  # a GPU dispatcher, or the simulator's kernel
        names.add(fn.__name__)
        source = inspect.getsource(fn)
        assert "pdl_wait()" in source, f"{fn.__name__} is marked for PDL but never waits"
        assert getattr(dispatcher, "pdl", False)
    # the batch-1 decode step's kernels: gemv (plain and with a prologue), the norms, qkv_prep, paged decode
    assert {"gemv_bf16_c4_t1", "gemv_silu_bf16_c12_t1", "fused_add_rms_norm_bf16_kernel"} <= names, sorted(names)
    assert any(n.startswith("qkv_prep_vec") for n in names) and any(n.startswith("paged_decode16") for n in names)
    assert any(n.startswith("paged_decode_prep_") for n in names)


def test_unmarked_kernels_are_not_launched_with_pdl():
    from kernels.rmsnorm import rms_norm_kernel  # the course's own kernel: no wait, so never PDL

    assert not getattr(rms_norm_kernel, "pdl", False)


def test_the_launch_hook_replaces_a_compiled_kernels_launch_once_and_launches_plainly_while_pdl_is_off(monkeypatch):
    calls = []

    class Compiled:  # stands in for numba's compiled kernel (_Kernel)
        debug = False

        def launch(self, args, griddim, blockdim, stream=0, sharedmem=0):
            calls.append((args, griddim, blockdim))

    kernel = Compiled()
    kl._allow_pdl(kernel, None)
    patched = kernel.launch
    kl._allow_pdl(kernel, None)  # numba calls the hook at every launch: the kernel is patched once
    assert kernel.launch is patched and patched.__func__ is kl._launch_pdl
    monkeypatch.setattr(kl, "PDL", False)
    assert not kl.pdl_active()
    kernel.launch((1, 2), (3, 1, 1), (32, 1, 1))  # PDL off: numba's own launch, unchanged arguments
    assert calls == [((1, 2), (3, 1, 1), (32, 1, 1))]


def test_the_instructions_are_compiled_for_sm_90_only():
    # numba's real compiler (no GPU needed), in a child process: the tests run under the CUDA simulator
    code = textwrap.dedent("""
        from numba import cuda
        from kernels._pdl import pdl_trigger, pdl_wait

        def k(a):
            pdl_trigger()
            pdl_wait()
            a[0] += 1.0

        for cc in ((8, 0), (8, 9), (9, 0)):
            ptx, _ = cuda.compile_ptx(k, "void(float32[::1])", cc=cc)
            print(cc[0] * 10 + cc[1], "griddepcontrol.wait;" in ptx, "griddepcontrol.launch_dependents;" in ptx)
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {int(line.split()[0]): line.split()[1:] for line in proc.stdout.splitlines()}
    assert found == {80: ["False", "False"], 89: ["False", "False"], 90: ["True", "True"]}, proc.stdout


def test_in_the_simulator_the_instructions_do_nothing():
    from kernels._env import simulator_enabled

    if not simulator_enabled():
        pytest.skip("the simulator's stand-ins")
    assert _pdl.pdl_wait() is None and _pdl.pdl_trigger() is None


def _needs_pdl():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if torch.cuda.get_device_capability() < _pdl.PDL_MIN_CC:
        pytest.skip("PDL needs sm_90 or newer")


@gpu
def test_a_chain_of_dependent_kernels_in_a_graph_gives_the_same_bits_with_pdl(monkeypatch):
    from kernels._timing import capture_graph
    from kernels.rmsnorm import fused_add_rms_norm

    _needs_pdl()
    gen = torch.Generator(device="cuda").manual_seed(0)
    w_up = (torch.randn(3072, 1024, device="cuda", generator=gen) * 0.03).to(torch.bfloat16)
    w_down = (torch.randn(1024, 3072, device="cuda", generator=gen) * 0.03).to(torch.bfloat16)
    norm_w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(1, 1024, device="cuda", generator=gen).to(torch.bfloat16)
    results = []
    for on in (False, True):
        monkeypatch.setattr(kl, "PDL", on)
        x, residual = x0.clone(), torch.zeros_like(x0)
        h, y = torch.empty(1, 3072, device="cuda", dtype=torch.bfloat16), torch.empty_like(x0)

        def step():  # 40 kernels, each reading the one before's output
            for _ in range(10):
                fused_add_rms_norm(x, residual, norm_w, 1e-6)
                g.gemv(x, w_up, out=h)
                g.gemv(h, w_down, out=y)
                x.copy_(y)

        graph = capture_graph(step)
        x.copy_(x0)
        residual.zero_()
        graph.replay()
        torch.cuda.synchronize()
        results.append((x.clone(), residual.clone()))
    assert kl.pdl_active() or not kl.PDL
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.isfinite(results[1][0].float()).all()


@gpu
def test_an_engine_with_pdl_gives_the_same_tokens(monkeypatch):
    from bench.models import QWEN3_06B
    from minivllm import LLM, SamplingParams

    _needs_pdl()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    answers = []
    for on in (False, True):
        monkeypatch.setattr(kl, "PDL", on)  # before the graphs are captured
        llm = LLM(QWEN3_06B, device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=4,
                  num_kv_blocks=64, seed=0)
        prompts = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]]
        answers.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert kl.pdl_active() == on
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert answers[0] == answers[1]
