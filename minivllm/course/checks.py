"""Check a learner's function against the reference, and tell "not attempted" from "wrong".

An exercise stub raises ``NotImplementedError``. :func:`check` then prints that the exercise is not
attempted and hands back the reference, so the notebook goes on. A wrong answer raises
:class:`CheckFailed` loudly, naming the case and what differs in it: the index of the worst tensor
element, or the path to the first differing item of a structured result (``result[2]``, ``result['text']``).
An exception raised inside the learner's code is reported with the case that raised it and the learner's
line. With ``script=True`` every case is a list of operations, and a failure names the first operation
whose result differs and shrinks the script to a short one that still fails. In ``solutions/`` notebooks,
:func:`require_solutions` makes "not attempted" an error too, so a solution can never silently skip.
"""

import inspect
from collections.abc import Callable, Iterable, Sequence

from minivllm.course.compare import CheckFailed, compare, describe_inputs, show
from minivllm.course.hints import barrier_hint, explain_exception
from minivllm.course.scripts import script_divergence, script_report, shrink_script

__all__ = ["CheckFailed", "attempted", "check", "describe_inputs", "is_stub", "require_solutions", "show"]

_STRICT = False


def require_solutions(on: bool = True) -> None:
    """Make every later :func:`check` fail on an unattempted exercise (solution notebooks)."""
    global _STRICT
    _STRICT = on


def is_stub(obj: object) -> bool:
    """Whether ``obj`` (function or numba kernel) still contains the exercise stub's ``raise``."""
    fn = getattr(obj, "py_func", obj)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return "raise NotImplementedError" in source


def _as_tuple(args) -> tuple:
    return args if isinstance(args, tuple) else (args,)


_FALLBACKS: set[int] = set()  # ids of references that check() handed back for an exercise not attempted


def attempted(*fns: Callable) -> bool:
    """Whether every one of ``fns`` is the learner's own (not a reference :func:`check` fell back to)."""
    return not any(id(fn) in _FALLBACKS for fn in fns)


def check(
    candidate: Callable,
    reference: Callable,
    cases: Iterable,
    *,
    name: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    uses: Sequence[object] = (),
    component: str | None = None,
    script: bool = False,
) -> Callable:
    """Run ``candidate`` and ``reference`` on every case; return the function the notebook should use.

    ``cases`` holds argument tuples (or single arguments). ``uses`` names kernels the candidate
    launches: if one of them is still a stub, the exercise counts as not attempted (on a GPU a
    ``raise`` inside a kernel is ignored, so the call alone cannot tell); a failure in the simulator
    then also says when one of them puts a barrier where only some threads reach it. ``component``
    (a name of ``minivllm.learner.COMPONENTS``): a passing candidate is saved to the learner's
    workspace, and ``LLM(learner=True)`` runs it. ``script``: every case is one script, a list of
    operations, and both functions return a list with one result per operation; a failure names the
    first operation whose result differs and shows a shortest failing script.

    Returns ``candidate`` when it matches, ``reference`` when the exercise is not attempted;
    raises :class:`CheckFailed` when it is wrong.
    """
    name = name or getattr(candidate, "__name__", "candidate")
    stubbed = [getattr(k, "__name__", str(k)) for k in uses if is_stub(k)]
    cases = [_as_tuple(c) for c in cases]
    try:
        if stubbed:
            raise NotImplementedError(", ".join(stubbed))
        worst = 0.0
        for i, args in enumerate(cases):
            where = f"❌ {name}, case {i + 1}/{len(cases)}"
            if script:
                (ops,) = args
                div = script_divergence(candidate, reference, list(ops), atol, rtol)
                if div is not None:
                    short, last = shrink_script(candidate, reference, list(ops), atol=atol, rtol=rtol)
                    raise CheckFailed(f"{where}: operation {div.index + 1} of {len(ops)}, {show(ops[div.index])}: "
                                      f"{div.problem}\n   {script_report(short, last, len(ops))}") from None
                continue
            want = reference(*args)
            try:
                got = candidate(*args)
            except NotImplementedError:
                raise
            except Exception as e:  # noqa: BLE001 -- the learner's code raised: say which case, and where
                raise CheckFailed(f"{where} ({describe_inputs(args)}): {explain_exception(e, uses)}") from None
            try:
                err, _ = compare(got, want, atol, rtol)
            except CheckFailed as e:
                raise CheckFailed(f"{where} ({describe_inputs(args)}): {e}{barrier_hint(uses)}") from None
            worst = max(worst, err)
    except NotImplementedError:
        if _STRICT:
            raise CheckFailed(f"❌ {name}: the solution is still a stub (NotImplementedError)") from None
        print(f"⏭️  {name}: not attempted yet — continuing with the reference implementation")
        _FALLBACKS.add(id(reference))
        return reference
    print(f"✅ {name}: {len(cases)}/{len(cases)} cases match the reference (worst |err| {worst:.2e})")
    if component is not None:
        from minivllm.course.workspace import record

        record(component, candidate)
    return candidate
