"""How ``course.check`` reports a wrong answer: which case, what differs in it, where the learner's code raised,
and (for scripts of operations, notebook 09) which operation diverged, with a shortest failing script."""

import heapq
import json
from pathlib import Path

import pytest
import torch

from kernels._env import simulator_enabled
from numba import cuda  # after kernels (conftest): the simulator is chosen before numba loads
from minivllm import course
from minivllm.course import hints

ROOT = Path(__file__).resolve().parents[1]
simulator_only = pytest.mark.skipif(not simulator_enabled(), reason="the simulator's errors and barrier rule")


def _fails(candidate, reference, cases, **kwargs) -> str:
    with pytest.raises(course.CheckFailed) as info:
        course.check(candidate, reference, cases, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- values and inputs
def test_a_case_without_inputs_names_the_item_of_the_result_that_differs():
    msg = _fails(lambda: ([1, 2], True, 1), lambda: ([1, 2], True, 0), [()], name="in the engine")
    assert msg == "❌ in the engine, case 1/1 (no inputs): result[2]: got 1, expected 0"


def test_non_tensor_inputs_and_nested_results_are_shown_readably():
    msg = _fails(lambda xs, s: {"n": len(xs), "ids": [1, 2, 4]}, lambda xs, s: {"n": len(xs), "ids": [1, 2, 3]},
                 [([5, 6, 7], "abc")], name="f")
    assert "case 1/1 (inputs [5, 6, 7], 'abc'): result['ids'][2]: got 4, expected 3" in msg
    msg = _fails(lambda x: [x.sum()], lambda x: [x.sum() + 1], [torch.ones(2, 3)], name="g")
    assert "(inputs tensor(2, 3) float32): result[0]: mismatch at index ()" in msg
    long = _fails(lambda xs: 0, lambda xs: 1, [(list(range(1000)),)], name="h")
    assert len(long) < 200 and "..." in long  # a long argument is shortened, not dumped


def test_lengths_keys_and_types_that_differ_are_named():
    assert "expected 3 items, got 2" in _fails(lambda: [1, 2], lambda: [1, 2, 3], [()])
    assert "keys differ: missing ['b']" in _fails(lambda: {"a": 1}, lambda: {"a": 1, "b": 2}, [()])
    assert "expected a torch.Tensor, got list" in _fails(lambda: [1.0], lambda: torch.ones(1), [()])


def test_equal_infinities_match_but_a_nan_fails():
    masked = torch.tensor([0.5, -float("inf")])
    assert course.check(lambda: masked.clone(), lambda: masked, [()]) is not None
    assert "NaN or inf: at index (1,)" in _fails(lambda: torch.tensor([0.5, float("nan")]), lambda: masked, [()])


def test_an_exception_in_the_learners_code_names_the_case_and_the_line():
    def mine(xs, i):
        return xs[i]  # past the end for the second case

    msg = _fails(mine, lambda xs, i: 0, [([0, 1], 0), ([0, 1], 2)], name="mine")
    assert msg.startswith("❌ mine, case 2/2 (inputs [0, 1], 2): IndexError: list index out of range")
    assert "in mine, line" in msg and "return xs[i]" in msg and "check your bounds" in msg


def test_not_attempted_still_hands_back_the_reference(capsys):
    def stub(x):
        raise NotImplementedError("exercise")

    assert course.check(stub, abs, [1]) is abs
    assert "not attempted" in capsys.readouterr().out


# ----------------------------------------------------------------------------- kernels in the simulator
@cuda.jit
def unchecked(x, out):
    i = cuda.grid(1)
    out[i] = x[i] * 2  # no `if i < x.size`


@simulator_only
def test_an_index_error_inside_a_simulated_kernel_names_the_case_and_the_thread():
    from kernels._launch import launch

    def mine(x):
        out = torch.empty_like(x)
        launch(unchecked, 1, 32, x, out, backend="simulator")
        return out

    msg = _fails(mine, lambda x: 2 * x, [torch.ones(32), torch.ones(20)], name="double", uses=(unchecked,))
    assert msg.startswith("❌ double, case 2/2 (inputs tensor(20,) float32): IndexError: tid=[")
    assert "out of bounds" in msg and "in the simulator this usually means an index past an array's end" in msg


_WARP0_ONLY = '''
@cuda.jit(device=True)
def my_reduce(v):
    o = 16
    while o > 0:
        v += cuda.shfl_xor_sync(0xFFFFFFFF, v, o)
        o //= 2
    return v


@cuda.jit
def warp0_only(x, out):
    total = cuda.shared.array(1, numba.float32)
    tid = cuda.threadIdx.x
    if tid == 0:
        total[0] = 0.0
    cuda.syncthreads()
    if tid < 32:  # only warp 0 sums: fine on a GPU, but its shuffles' barriers pair with warp 1's syncthreads
        acc = my_reduce(x[tid])
        if tid == 0:
            total[0] = acc
    cuda.syncthreads()
    out[tid] = total[0]  # every thread reads the total
'''


def test_barriers_under_a_thread_dependent_if_are_found_and_hinted(tmp_path):
    path = tmp_path / "warp0.py"
    path.write_text("import numba\nfrom numba import cuda\n" + _WARP0_ONLY)
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)  # a file, so inspect can read the kernels' source
    line = path.read_text().splitlines().index("    if tid < 32:  # only warp 0 sums: fine on a GPU, but its "
                                               "shuffles' barriers pair with warp 1's syncthreads") + 1
    found = hints.barriers_under_if([ns["warp0_only"], ns["my_reduce"]])
    assert found == [f"`if tid < 32:` in warp0_only (line {line}) calls my_reduce (shfl_xor_sync inside)"]
    import kernels  # noqa: F401 -- the package's kernels follow the rule: nothing to hint
    from kernels import _reduce, basics, rmsnorm

    assert hints.barriers_under_if([_reduce.group_reduce_sum, basics.warp_sum_kernel,
                                     rmsnorm.rms_norm_kernel]) == []
    if simulator_enabled():
        from kernels._launch import launch

        def mine(x):
            out = torch.zeros(64)
            launch(ns["warp0_only"], 1, 64, x, out, backend="simulator")
            return out

        msg = _fails(mine, lambda x: x[:32].sum().expand(64).clone(), [torch.ones(64)], name="warp sum",
                     uses=(ns["warp0_only"], ns["my_reduce"]))
        assert "mismatch at index (32,): got 0, expected 32" in msg  # warp 1 read the total before it was written
        assert "hint: `if tid < 32:` in warp0_only" in msg and "raises no error" in msg


# ----------------------------------------------------------------------------- scripts of operations
def _stack_ops(script, *, bug: bool) -> list:
    """A stack: ("push", x) -> None, ("pop", 0) -> the top or None; the bug: pop takes the bottom when 4 are held."""
    stack, out = [], []
    for op, arg in script:
        if op == "push":
            stack.append(arg)
            out.append(None)
        else:
            out.append((stack.pop(0) if bug and len(stack) == 4 else stack.pop()) if stack else None)
    return out


def test_a_script_failure_names_the_operation_and_shrinks_the_script():
    ops = [("push", 5), ("pop", 0), ("push", 1), ("push", 2), ("pop", 0), ("push", 7), ("push", 8), ("push", 9),
           ("pop", 0), ("push", 3), ("pop", 0)]
    msg = _fails(lambda s: _stack_ops(s, bug=True), lambda s: _stack_ops(s, bug=False), [(ops,)], name="stack",
                 script=True)
    head, *table = msg.splitlines()
    assert head == "❌ stack, case 1/1: operation 9 of 11, ('pop', 0): yours 1, expected 9"
    assert "shortest failing script found (5 of 11 operations" in table[0]  # 4 pushes and the pop
    assert [line.split()[1] for line in table[1:]] == ["('push',"] * 4 + ["('pop',"]
    assert table[-1].endswith("-> yours 0, expected 1   <- differs")  # arguments shrunk to 0 and 1 too


def test_a_script_that_raises_names_the_operation_that_raised():
    def crashes(script):
        return [1 // arg for _, arg in script]

    msg = _fails(crashes, lambda s: [0 for _ in s], [([("div", 5), ("div", 0), ("div", 3)],)], name="div",
                 script=True)
    head, table, *ops = msg.splitlines()
    assert head.startswith("❌ div, case 1/1: operation 2 of 3, ('div', 0): raised ZeroDivisionError")
    assert "return [1 // arg" in head  # the learner's line
    assert "(1 of 3 operations" in table and len(ops) == 1 and "raised ZeroDivisionError" in ops[0]


def _notebook_09() -> dict:
    """The code of notebook 09's exercises and checks, as the solution notebook has it."""
    cells = ["".join(c["source"]) for c in json.loads((ROOT / "solutions" / "09_radix_tree.ipynb").read_text())["cells"]
             if c["cell_type"] == "code"]
    ns: dict = {}
    exec("from minivllm import course\nfrom minivllm.cache import BlockAllocator, RadixCache", ns)
    for marker in ("class Node", "def match_prefix(root", "def insert(root", "def run_on_radix_cache",
                   "def evict(root"):
        exec(next(c for c in cells if marker in c), ns)
    ns["check_cell"] = next(c for c in cells if 'name="evict"' in c)
    return ns


def _evict_newest_first(root, n, block_size):
    """A known-wrong evict: most recently used first."""
    heap, stack = [], [root]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node is not root and not node.children and not node.locked:
            heap.append((-node.last_used, id(node), node))
    heapq.heapify(heap)
    freed = []
    while len(freed) < n and heap:
        _, _, node = heapq.heappop(heap)
        del node.parent.children[node.key[:block_size]]
        freed += node.blocks
        if node.parent is not root and not node.parent.children and not node.parent.locked:
            heapq.heappush(heap, (-node.parent.last_used, id(node.parent), node.parent))
    return freed


def test_notebook_09s_check_names_the_eviction_that_differs_in_a_few_lines(capsys):
    ns = _notebook_09()
    exec(ns["check_cell"], ns)  # the solution passes
    assert "✅ evict" in capsys.readouterr().out
    ns["evict"] = _evict_newest_first
    with pytest.raises(course.CheckFailed) as info:
        exec(ns["check_cell"], ns)
    msg = str(info.value)
    head, _, *ops = msg.splitlines()
    assert head.startswith("❌ evict, case 1/") and ", ('evict', 1): yours [" in head
    assert len(msg) < 500 and len(ops) <= 4 and ops[-1].strip().startswith(f"{len(ops)}  ('evict',")
