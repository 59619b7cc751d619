"""Phase 08's kernel exercises: the answer key, the check cases, and the solution kernels of notebook 08.

* ``minivllm.course.paged_exercise.split_partials`` (the split kernel's answer key), merged by the package's
  ``merge_partials``, is the package's gather + SDPA reference: the key is right before it judges anyone.
* The cases hold what the notebook says they hold (shuffled blocks, contexts ending mid-block, a context of 1,
  empty splits, GQA, padding slots) and stay small enough for the simulator.
* The solution kernels, taken from ``solutions/08_paged_kv_cache.ipynb``, pass the notebook's checks; each of a
  set of typical mistakes (a mutation of the solution) fails them; they compile for sm_90; saved to a workspace
  they pass ``minivllm.learner``'s load-time checks; on a GPU the learner's engine serves the package's tokens.
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

from kernels.paged_attention import merge_partials, paged_attention_ref
from kernels.store_kv import store_kv_ref
from minivllm import course, learner
from minivllm.course import paged_exercise as pe
from minivllm.course.checks import CheckFailed
from minivllm.utils import cdiv

ROOT = Path(__file__).resolve().parents[1]
CELLS = ("c12", "c19", "c22")  # store_kv kernel + launcher, merge kernel, split kernel + launchers


def solution_source() -> str:
    """The solution notebook's kernel cells, as one module (its earlier cells import torch)."""
    cells = {c["id"]: "".join(c["source"]) for c in json.loads((ROOT / "solutions/08_paged_kv_cache.ipynb").read_text())
             ["cells"]}
    return "import torch\n\n" + "\n\n\n".join(cells[c] for c in CELLS) + "\n"


def load(tmp_path: Path, source: str, name: str):
    """Import ``source`` as module ``name`` from a file (so ``inspect`` finds the kernels' source)."""
    (tmp_path / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        __import__(name)
    finally:
        sys.path.remove(str(tmp_path))
    return sys.modules[name]


def store_kv_reference(key, value, kv_cache, slot_mapping):
    want = kv_cache.clone()
    store_kv_ref(key, value, want, slot_mapping)
    return want


def paged_reference(q, kv_cache, block_tables, context_lens, max_context_len=None, tokens_per_split=None):
    return paged_attention_ref(q, kv_cache, block_tables, context_lens)


def as_split_args(q, kv_cache, block_tables, context_lens, max_context_len, tokens_per_split):
    return q, kv_cache, block_tables, context_lens, tokens_per_split, cdiv(max_context_len or int(context_lens.max()),
                                                                           tokens_per_split)


def notebook_checks(mod) -> None:
    """The checks of notebook 08's cells c12b, c20 and c22b, in that order (CheckFailed at the first failure)."""
    course.check(mod.my_store_kv, store_kv_reference, pe.store_kv_cases(), atol=0, rtol=0)
    course.check(mod.my_merge, merge_partials, pe.merge_cases())
    cases = pe.decode_cases()
    course.check(lambda *a: pe.seen_only(mod.my_split_partials(*a)), lambda *a: pe.seen_only(pe.split_partials(*a)),
                 [as_split_args(*c) for c in cases], atol=1e-5, rtol=1e-4)
    course.check(mod.my_paged_attention, paged_reference, cases, atol=1e-5, rtol=1e-2)


# ----------------------------------------------------------------------------- the answer key and the cases
def test_split_partials_merged_are_gather_plus_sdpa():
    for q, pool, tables, lens, max_len, per_split in pe.decode_cases():
        splits = cdiv(max_len or int(lens.max()), per_split)
        merged = merge_partials(*pe.split_partials(q, pool, tables, lens, per_split, splits))
        torch.testing.assert_close(merged, paged_attention_ref(q.float(), pool.float(), tables, lens), atol=1e-5,
                                   rtol=1e-5)


def test_empty_splits_are_zero_with_minus_infinity_max():
    q, pool, tables, lens, _, _ = pe.decode_cases()[0]  # contexts [13, 1], 8 keys per split
    out, m, l = pe.split_partials(q, pool, tables, lens, 8, 2)
    assert l[1, :, 1].eq(0).all() and m[1, :, 1].eq(-torch.inf).all() and out[1, :, 1].eq(0).all()
    assert (l[0] > 0).all() and torch.isfinite(m[0]).all()
    seen = pe.seen_only((out, m, l))
    assert torch.isfinite(seen[1]).all() and torch.equal(seen[2], l)


def test_decode_cases_hold_what_the_notebook_says():
    cases = pe.decode_cases()
    found = set()
    for q, pool, tables, lens, max_len, per_split in cases:
        block_size, kv_heads = pool.shape[2], pool.shape[3]
        splits = cdiv(max_len or int(lens.max()), per_split)
        assert q.shape[0] * kv_heads * splits <= 4 and q.shape[0] * q.shape[1] <= 8  # simulator-sized grids
        for s, n in enumerate(lens.tolist()):
            used = tables[s, :cdiv(n, block_size)]
            assert (used >= 0).all() and (tables[s, cdiv(n, block_size):] == -1).all()
            found |= {"mid-block"} if n % block_size else set()
            found |= {"context 1"} if n == 1 else set()
            found |= {"empty split"} if cdiv(n, per_split) < splits else set()
        found |= {"shuffled"} if not torch.equal(tables[tables >= 0].sort().values, tables[tables >= 0]) else set()
        found |= {f"GQA {q.shape[1] // kv_heads}", str(q.dtype)}
        found |= {"max_context_len past the longest"} if max_len and max_len > int(lens.max()) else set()
        found |= {"two tiles"} if per_split > 32 and int(lens.max()) > 32 else set()  # the simulator's tile: 32
    assert {"mid-block", "context 1", "empty split", "shuffled", "GQA 2", "GQA 4", "torch.float32",
            "torch.bfloat16", "max_context_len past the longest", "two tiles"} <= found, found
    assert "1 empty split(s)" in pe.describe_decode_case(cases[0]) and "GQA 4" in pe.describe_decode_case(cases[1])


def test_store_kv_cases_have_padding_and_more_elements_than_the_simulator_grid():
    cases = pe.store_kv_cases()
    assert all((slots == -1).any() and (slots >= 0).any() for *_, slots in cases)
    assert max(key.numel() for key, *_ in cases) > 4 * 64  # a grid-stride loop is needed
    assert {key.dtype for key, *_ in cases} == {torch.float32, torch.bfloat16}
    for key, value, cache, slots in cases:  # the slots are distinct, and in range
        kept = slots[slots >= 0]
        assert len(kept.unique()) == len(kept) and kept.max() < cache.shape[0] * cache.shape[2]


def test_merge_cases_have_an_empty_split_and_far_apart_maxima():
    cases = pe.merge_cases()
    assert any((l == 0).any() for _, _, l in cases)
    spread = max(float((m.amax(-1) - m.masked_fill(l == 0, torch.inf).amin(-1)).max()) for _, m, l in cases)
    assert spread > 5  # exp(m_s - M) far from 1: a merge without it fails


def test_draw_decode_grid_colours_each_key_by_its_split():
    import matplotlib

    matplotlib.use("Agg")
    fig = pe.draw_decode_grid([40, 21, 5], [[0, 3, 5], [1, 4], [2]], block_size=16, tokens_per_split=20, tile=8)
    patches = [p for p in fig.axes[0].patches if p.get_width() == 1]
    assert len(patches) == 40 + 21 + 5  # one cell per key in a context, none past it
    colours = {(p.get_x(), p.get_y()): p.get_facecolor() for p in patches}
    assert colours[(19, 0)] != colours[(20, 0)] and colours[(0, 0)] == colours[(19, 0)]  # the split boundary
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "block 5" in texts and any("no key" in t for t in texts)  # C's second split is empty


# ----------------------------------------------------------------------------- the solution kernels
@pytest.fixture(scope="module")
def solution(tmp_path_factory):
    return load(tmp_path_factory.mktemp("solution"), solution_source(), "answer_08")


MUTATIONS = {  # a typical mistake -> (what the solution says, what the mistaken kernel says)
    "store_kv stores padding rows": ("        if slot >= 0:\n            kv_cache[slot // block_size, 0",
                                     "        if True:\n            kv_cache[slot // block_size, 0"),
    "store_kv without a grid-stride loop": ("    while i < tokens * heads * dim:", "    if i < tokens * heads * dim:"),
    "merge without rescaling by exp(m_s - M)": (
        "acc += partial_out[seq, h, s, d] * (exp_sums[seq, h, s] * math.exp(max_logits[seq, h, s] - m))",
        "acc += partial_out[seq, h, s, d] * exp_sums[seq, h, s]"),
    "logical block used as physical": ("b = block_tables[seq, j // block_size]", "b = j // block_size"),
    "reads whole blocks past the context": (
        "end = min(context_lens[seq], start + tokens_per_split)",
        "end = min((context_lens[seq] + block_size - 1) // block_size * block_size, start + tokens_per_split)"),
    "accumulator not rescaled between tiles": ("                    acc[g, k] *= alpha_sh[g]\n",
                                               "                    acc[g, k] *= 1.0\n"),
    "0 / 0 in an empty split": ("acc[g, k] / l if l > 0.0 else 0.0", "acc[g, k] / l"),
    "query head h = kvh + g (GQA ignored)": ("partial_out[seq, kvh * group + g, split, d]",
                                             "partial_out[seq, kvh + g, split, d]"),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the simulator's 0 / 0
@pytest.mark.parametrize("mistake", MUTATIONS)
def test_a_typical_mistake_fails_the_notebooks_checks(mistake, tmp_path):
    right, wrong = MUTATIONS[mistake]
    source = solution_source()
    assert source.count(right) == 1, right
    mod = load(tmp_path, source.replace(right, wrong), f"mistake_{abs(hash(mistake))}")
    with pytest.raises(CheckFailed, match="case"):
        notebook_checks(mod)


def kernels_only(source: str) -> str:
    """The ``@cuda.jit`` functions of ``source`` with the constants and the math/numba imports they use: no torch,
    so a compiler subprocess starts in a second or two."""
    def wanted(node) -> bool:
        if isinstance(node, ast.Import | ast.ImportFrom):
            return all(a.name.split(".")[0] in ("math", "numba", "cuda") for a in node.names) and \
                getattr(node, "module", None) in (None, "numba")
        if isinstance(node, ast.FunctionDef):
            return any("cuda.jit" in ast.unparse(d) for d in node.decorator_list)
        return isinstance(node, ast.Assign)
    return ast.unparse(ast.Module([n for n in ast.parse(source).body if wanted(n)], type_ignores=[]))


COMPILE = textwrap.dedent('''
    import sys
    from numba import cuda
    sys.path.insert(0, sys.argv[1])
    import answer_08 as m
    for t in ("float32", "bfloat16"):
        sigs = {
            m.my_store_kv_kernel: f"void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, :, :, ::1], int64[::1])",
            m.my_split_kernel: f"void({t}[:, :, ::1], {t}[:, :, :, :, ::1], int32[:, ::1], int32[::1], float32, "
                               "int64, float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1])",
            m.my_merge_kernel: f"void(float32[:, :, :, ::1], float32[:, :, ::1], float32[:, :, ::1], {t}[:, :, ::1])",
        }
        for kernel, sig in sigs.items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            print(kernel.py_func.__name__, t, "ok", len(ptx))
''')


def test_the_solution_kernels_compile_for_sm_90(tmp_path):
    """The simulator does no type inference: numba's real compiler checks the kernels as a GPU would build them."""
    (tmp_path / "answer_08.py").write_text(kernels_only(solution_source()))
    proc = subprocess.run([sys.executable, "-c", COMPILE, str(tmp_path)], env=dict(os.environ, NUMBA_ENABLE_CUDASIM="0"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 6, proc.stdout


@pytest.fixture(scope="module")
def workspace(solution, tmp_path_factory):
    from minivllm.course import workspace as ws

    folder = tmp_path_factory.mktemp("workspace")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINIVLLM_WORKSPACE", str(folder))
    try:
        assert ws.record("store_kv", solution.my_store_kv) == folder / "store_kv.py"
        assert ws.record("paged_attention", solution.my_paged_attention) == folder / "paged_attention.py"
    finally:
        mp.undo()
    return folder


def test_saved_kernels_pass_the_load_time_checks(workspace):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("store_kv", "paged_attention"):
        fn = learner._load(workspace / f"{name}.py")
        assert learner.CHECKS[name](fn, device) == "", name  # in the simulator on a CPU
    report = {n: (w, why) for n, w, why in learner.load_parts(workspace, "cpu").report}
    assert report["store_kv"][0] == report["paged_attention"][0] == "package"  # GPU-only components
    assert "on a GPU" in report["paged_attention"][1]


@pytest.mark.gpu
def test_the_learners_kernels_serve_the_packages_tokens_on_a_gpu(workspace):
    from minivllm.llm import LLM
    from minivllm.sampling_params import SamplingParams

    parts = learner.load_parts(workspace, "cuda")
    whose = {n: (w, why) for n, w, why in parts.report}
    assert whose["store_kv"][0] == whose["paged_attention"][0] == "yours", whose
    chat = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colours.")]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    # fp32: the two attention kernels differ only in summation order, so greedy tokens agree
    small = dict(num_kv_blocks=512, cuda_graph_max_batch=8)  # two engines on one GPU: neither takes 90% of it
    mine, package = LLM(learner=str(workspace), dtype="float32", **small), LLM(dtype="float32", **small)
    assert {n for n, w, _ in mine.engine.learner_report if w == "yours"} >= {"store_kv", "paged_attention"}
    a, b = (llm.chat(chat, greedy, use_tqdm=False) for llm in (mine, package))
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    del mine, package
    # bf16 (the default on a GPU), decode in CUDA graphs: the answer, and the first tokens as the package's
    mine = LLM(learner=str(workspace), **small).chat(chat[:1], greedy, use_tqdm=False)[0].outputs[0]
    ref = LLM(**small).chat(chat[:1], greedy, use_tqdm=False)[0].outputs[0]
    assert "Paris" in mine.text and mine.token_ids[:4] == ref.token_ids[:4], (mine.text, ref.text)
