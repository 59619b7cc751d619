"""Comparing a learner's result with the reference's, and saying where they differ, for :func:`~minivllm.course.check`.

:func:`compare` walks tensors (worst element beyond the tolerance), sequences and mappings (the path to the
first differing item: ``result[2]``, ``result['ids'][0]``) and plain values; :func:`show` and
:func:`describe_inputs` print values short enough for a one-line failure message.
"""

import reprlib
from collections.abc import Mapping, Sequence

import torch


class CheckFailed(AssertionError):
    """A learner's function disagrees with the reference."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 4, 12, 8, 6
_REPR.maxstring, _REPR.maxother = 60, 60


def show(value: object) -> str:
    """A short readable form of a value: tensors by shape and dtype, the rest as a shortened ``repr``."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if type(value).__module__ == "numpy" and hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"array{tuple(value.shape)} {value.dtype}"
    return _REPR.repr(value)


def describe_inputs(args: tuple, limit: int = 200) -> str:
    """The arguments of one case, for a failure message: ``inputs tensor(4, 64) float32, 1e-06``."""
    if not args:
        return "no inputs"
    text = ", ".join(show(a) for a in args)
    return "inputs " + (text if len(text) <= limit else text[: limit - 3] + "...")


def compare(got, want, atol: float, rtol: float, path: str = "result") -> tuple[float, str]:
    """Return (worst error, description); raise CheckFailed on a mismatch, naming where (``path``)."""
    at = "" if path == "result" else f"{path}: "
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"{at}expected a torch.Tensor, got {type(got).__name__} {show(got)}")
        if got.shape != want.shape:
            raise CheckFailed(f"{at}shape {tuple(got.shape)} != expected {tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise CheckFailed(f"{at}dtype {got.dtype} != expected {want.dtype}")
        if got.numel() == 0:
            return 0.0, ""
        same = got.double() == want.double()  # equal values, equal infinities included
        if not (torch.isfinite(got) | same).all():
            bad = tuple(int(i) for i in (~(torch.isfinite(got) | same)).nonzero()[0])
            raise CheckFailed(f"{at}the result contains NaN or inf: at index {bad} got {got[bad].item()}, "
                              f"expected {want[bad].item():.6g}")
        diff = torch.where(same, 0.0, (got.double() - want.double()).abs())
        excess = diff - (atol + rtol * want.double().abs())
        worst = int(excess.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        err = float(diff.max())
        if float(excess.flatten()[worst]) > 0:
            raise CheckFailed(
                f"{at}mismatch at index {where}: got {got.flatten()[worst].item():.6g}, "
                f"expected {want.flatten()[worst].item():.6g} (max |err| {err:.3g}, atol {atol}, rtol {rtol})"
            )
        return err, ""
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            raise CheckFailed(f"{at}expected a {type(want).__name__}, got {type(got).__name__} {show(got)}")
        missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
        if missing or extra:
            raise CheckFailed(f"{at}keys differ: missing {show(missing)}, unexpected {show(extra)}")
        errs = [compare(got[k], w, atol, rtol, f"{path}[{k!r}]")[0] for k, w in want.items()]
        return max(errs, default=0.0), ""
    if isinstance(want, Sequence) and not isinstance(want, (str, bytes)):
        if not isinstance(got, Sequence) or isinstance(got, (str, bytes)):
            raise CheckFailed(f"{at}expected a {type(want).__name__} of {len(want)} items, "
                              f"got {type(got).__name__} {show(got)}")
        if len(got) != len(want):
            raise CheckFailed(f"{at}expected {len(want)} items, got {len(got)}: {show(got)} "
                              f"(expected {show(want)})")
        errs = [compare(g, w, atol, rtol, f"{path}[{i}]")[0] for i, (g, w) in enumerate(zip(got, want))]
        return max(errs, default=0.0), ""
    if got != want:
        raise CheckFailed(f"{at}got {show(got)}, expected {show(want)}")
    return 0.0, ""
