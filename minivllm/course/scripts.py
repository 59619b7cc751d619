"""Checks of scripts of operations (notebook 09's trees): the first operation that differs, and a short repro.

A script is a list of operations, such as ``("insert", [1, 2, 3, 4])``; the learner's and the reference's
functions each run a whole script and return one result per operation. :func:`script_divergence` finds the
first operation whose result differs (or that raised), :func:`shrink_script` looks for a shortest script that
still fails (dropping operations, shortening list arguments, lowering int arguments) and
:func:`script_report` prints it operation by operation.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from minivllm.course.compare import CheckFailed, compare, show
from minivllm.course.hints import explain_exception


@dataclass(slots=True)
class Divergence:
    """Where a learner's script run first differs from the reference's."""

    index: int  # the first operation whose result differs (or that raised)
    got: list  # the candidate's results of the operations before it (and its own, when it returned)
    want: list
    problem: str  # what differs


def script_divergence(candidate: Callable, reference: Callable, script: list, atol: float,
                      rtol: float) -> Divergence | None:
    """The first operation of ``script`` on which ``candidate`` and ``reference`` differ; None if they agree."""
    want = reference(script)
    try:
        got = candidate(script)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 -- find the operation that raised: the shortest prefix that raises
        error, before = e, []
        for k in range(len(script)):
            try:
                before = candidate(script[:k + 1])
            except Exception as e_k:  # noqa: BLE001
                error = e_k
                break
        else:
            k = len(script) - 1
        return Divergence(k, list(before), list(want), f"raised {explain_exception(error)}")
    if not isinstance(got, Sequence) or len(got) != len(want):
        count = f"{len(got)} results" if isinstance(got, Sequence) else f"a {type(got).__name__}"
        k = max(0, min(len(got) if isinstance(got, Sequence) else 0, len(script) - 1))
        return Divergence(k, list(got) if isinstance(got, Sequence) else [], list(want),
                           f"returned {count} for {len(script)} operations")
    for k, (g, w) in enumerate(zip(got, want)):
        try:
            compare(g, w, atol, rtol, "result")
        except CheckFailed as e:
            tensors = any(isinstance(x, torch.Tensor) for x in (g, w))
            return Divergence(k, list(got), list(want), str(e) if tensors else f"yours {show(g)}, expected {show(w)}")
    return None


def _smaller(op) -> Iterable:
    """Simpler versions of one operation ``(name, argument, ...)``: list arguments with an item dropped,
    int arguments made smaller."""
    if not isinstance(op, tuple):
        return
    for j, arg in enumerate(op):
        if isinstance(arg, list):
            for i in reversed(range(len(arg))):
                yield op[:j] + (arg[:i] + arg[i + 1:],) + op[j + 1:]
        elif isinstance(arg, int) and not isinstance(arg, bool) and arg > 0:
            for smaller in sorted({0, 1, arg // 2, arg - 1} - {arg}):
                yield op[:j] + (smaller,) + op[j + 1:]


def shrink_script(candidate: Callable, reference: Callable, script: list, *, atol: float = 1e-5,
                  rtol: float = 1e-5, budget: int = 3000) -> tuple[list, Divergence]:
    """A short script on which ``candidate`` still differs from ``reference``: cut after the first differing
    operation, then remove operations (halves, quarters, ..., single ones) and simplify their arguments
    while it still fails. ``budget`` bounds the number of runs."""
    div = script_divergence(candidate, reference, script, atol, rtol)
    assert div is not None, "shrink_script needs a failing script"
    script = list(script[: div.index + 1])

    def fails(trial: list) -> bool:
        nonlocal script, div, budget
        if budget <= 0:
            return False
        budget -= 1
        d = script_divergence(candidate, reference, trial, atol, rtol)
        if d is None:
            return False
        script, div = trial[: d.index + 1], d
        return True

    changed = True
    while changed and budget > 0:
        changed = False
        size = max(len(script) // 2, 1)
        while size >= 1:
            i = 0
            while i < len(script):
                if not fails(script[:i] + script[i + size:]):
                    i += size
                else:
                    changed = True
            size //= 2
        for i in range(len(script)):
            for simpler in _smaller(script[i] if i < len(script) else None):
                if i < len(script) and fails(script[:i] + [simpler] + script[i + 1:]):
                    changed = True
                    break
    return script, div


def script_report(script: list, div: Divergence, full_len: int) -> str:
    ops = [show(op) for op in script]
    width = min(max(map(len, ops)), 48)
    lines = []
    for k, op in enumerate(ops):
        if k < div.index:
            lines.append(f"     {k + 1:>2}  {op:<{width}}  -> {show(div.want[k])}")
        else:
            lines.append(f"     {k + 1:>2}  {op:<{width}}  -> {div.problem}   <- differs")
    return (f"shortest failing script found ({len(script)} of {full_len} operations; -> the reference's result):\n"
            + "\n".join(lines))
