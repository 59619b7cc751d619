"""Check a learner's function against the reference, and tell "not attempted" from "wrong".

An exercise stub raises ``NotImplementedError``. :func:`check` then prints that the exercise is not
attempted and hands back the reference, so the notebook goes on. A wrong answer raises
:class:`CheckFailed` loudly with the worst error. In ``solutions/`` notebooks,
:func:`require_solutions` makes "not attempted" an error too, so a solution can never silently skip.
"""

import inspect
from collections.abc import Callable, Iterable, Sequence

import torch

_STRICT = False


class CheckFailed(AssertionError):
    """A learner's function disagrees with the reference."""


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


def _compare(got, want, atol: float, rtol: float) -> tuple[float, str]:
    """Return (worst error, description); raise CheckFailed on a structural mismatch."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"expected a torch.Tensor, got {type(got).__name__}")
        if got.shape != want.shape:
            raise CheckFailed(f"shape {tuple(got.shape)} != expected {tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise CheckFailed(f"dtype {got.dtype} != expected {want.dtype}")
        diff = (got.double() - want.double()).abs()
        if diff.numel() == 0:
            return 0.0, ""
        if not torch.isfinite(got).all():
            raise CheckFailed("the result contains NaN or inf")
        excess = diff - (atol + rtol * want.double().abs())
        worst = int(excess.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        err = float(diff.max())
        if float(excess.flatten()[worst]) > 0:
            raise CheckFailed(
                f"mismatch at index {where}: got {got.flatten()[worst].item():.6g}, "
                f"expected {want.flatten()[worst].item():.6g} (max |err| {err:.3g}, atol {atol}, rtol {rtol})"
            )
        return err, ""
    if isinstance(want, Sequence) and not isinstance(want, str):
        if not isinstance(got, Sequence) or len(got) != len(want):
            raise CheckFailed(f"expected a sequence of {len(want)} items, got {got!r}")
        errs = [_compare(g, w, atol, rtol)[0] for g, w in zip(got, want)]
        return max(errs, default=0.0), ""
    if got != want:
        raise CheckFailed(f"got {got!r}, expected {want!r}")
    return 0.0, ""


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
) -> Callable:
    """Run ``candidate`` and ``reference`` on every case; return the function the notebook should use.

    ``cases`` holds argument tuples (or single arguments). ``uses`` names kernels the candidate
    launches: if one of them is still a stub, the exercise counts as not attempted (on a GPU a
    ``raise`` inside a kernel is ignored, so the call alone cannot tell). ``component`` (a name of
    ``minivllm.learner.COMPONENTS``): a passing candidate is saved to the learner's workspace, and
    ``LLM(learner=True)`` runs it.

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
            want = reference(*args)
            got = candidate(*args)
            try:
                err, _ = _compare(got, want, atol, rtol)
            except CheckFailed as e:
                shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else repr(a) for a in args)
                raise CheckFailed(f"❌ {name}, case {i + 1}/{len(cases)} (inputs {shapes}): {e}") from None
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
