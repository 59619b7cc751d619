"""Why a learner's kernel or function failed: the exception, the learner's line, and the simulator's barrier rule.

:func:`explain_exception` says what was raised and where in the learner's own code, with a hint for the usual
cause. :func:`barrier_hint` reads the kernels' source: a ``syncthreads()`` or warp shuffle under an ``if`` on
a thread-dependent condition breaks numba's simulator silently (it raises nothing: it releases a barrier
once every live thread waits at *any* barrier), so a failing check in the simulator points at that line.
"""

import ast
import inspect
import sys
import textwrap
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

_BARRIERS = frozenset({"syncthreads", "syncthreads_count", "syncthreads_and", "syncthreads_or", "syncwarp",
                       "shfl_sync", "shfl_up_sync", "shfl_down_sync", "shfl_xor_sync"})


def _python_function(obj):
    """The Python function behind ``obj``: a numba kernel keeps it as ``py_func``, the simulator as ``fn``."""
    for attr in ("py_func", "fn"):
        inner = getattr(obj, attr, None)
        if inspect.isfunction(inner):
            return inner
    return obj if inspect.isfunction(obj) else None


def _called_name(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _tree(fn) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None


def _thread_dependent(tree: ast.AST) -> set[str]:
    """Names whose value differs between the threads of a block: assigned (directly or through other such
    names) from ``cuda.threadIdx``, ``cuda.grid(...)`` or ``cuda.laneid``."""
    def depends(expr: ast.AST, names: set[str]) -> bool:
        for n in ast.walk(expr):
            if isinstance(n, ast.Attribute) and n.attr in ("threadIdx", "laneid"):
                return True
            if isinstance(n, ast.Call) and _called_name(n) == "grid":
                return True
            if isinstance(n, ast.Name) and n.id in names:
                return True
        return False

    names: set[str] = set()
    while True:
        before = len(names)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None \
                    and depends(node.value, names):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {n.id for t in targets for n in ([t] if isinstance(t, ast.Name) else getattr(t, 'elts', []))
                          if isinstance(n, ast.Name)}  # plain names (``a`` or ``a, b``), not array elements
        if len(names) == before:
            return names


def _callee(fn, call: ast.Call):
    """The function object a call in ``fn`` names (``f(...)`` or ``module.f(...)``), looked up in its globals."""
    f = call.func
    if isinstance(f, ast.Name):
        return fn.__globals__.get(f.id)
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return getattr(fn.__globals__.get(f.value.id), f.attr, None)
    return None


def _barrier_inside(fn, depth: int = 3, seen: set | None = None) -> str:
    """The first barrier call (``syncthreads``, a shuffle) that ``fn`` makes, itself or through what it calls."""
    seen = set() if seen is None else seen
    fn = _python_function(fn)
    if fn is None or id(fn) in seen or depth < 0 or (tree := _tree(fn)) is None:
        return ""
    seen.add(id(fn))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    direct = sorted({_called_name(c) for c in calls} & _BARRIERS)
    if direct:
        return direct[0]
    for c in calls:
        if (inner := _barrier_inside(_callee(fn, c), depth - 1, seen)):
            return inner
    return ""


def barriers_under_if(functions: Iterable[object]) -> list[str]:
    """Each ``if`` on a thread-dependent condition (``tid``, ``lane``, ``warp``, ... from ``cuda.threadIdx`` or
    ``cuda.grid``) in ``functions`` (kernels and device functions) whose branch makes a barrier call:
    ``syncthreads``, a warp shuffle, or a function that makes one. Returned as "``if warp == 0:`` in
    my_kernel (line 12) calls my_warp_reduce (shfl_xor_sync inside)"."""
    found = []
    for fn in dict.fromkeys(f for f in map(_python_function, functions) if f is not None):
        tree = _tree(fn)
        if tree is None:
            continue
        varying = _thread_dependent(tree)
        first = fn.__code__.co_firstlineno
        for node in ast.walk(tree):
            if not isinstance(node, (ast.If, ast.IfExp)):
                continue
            test_names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
            if not (test_names & varying or any(isinstance(n, ast.Attribute) and n.attr == "threadIdx"
                                                for n in ast.walk(node.test))):
                continue  # the same for every thread of the block
            branches = [*node.body, *node.orelse] if isinstance(node, ast.If) else [node.body, node.orelse]
            for call in (c for b in branches for c in ast.walk(b) if isinstance(c, ast.Call)):
                name = _called_name(call)
                inner = "" if name in _BARRIERS else _barrier_inside(_callee(fn, call))
                if name in _BARRIERS or inner:
                    what = name if name in _BARRIERS else f"{name} ({inner} inside)"
                    found.append(f"`if {ast.unparse(node.test)}:` in {fn.__name__} (line {first + node.lineno - 1}) "
                                 f"calls {what}")
                    break
    return found


def _simulator_on() -> bool:
    from kernels._env import simulator_enabled

    return simulator_enabled()


def barrier_hint(uses: Sequence[object]) -> str:
    """The simulator's barrier rule, when a kernel in ``uses`` puts a barrier where only some threads reach it."""
    if not uses or not _simulator_on():
        return ""
    found = barriers_under_if(uses)
    if not found:
        return ""
    return ("\n   hint: " + "; ".join(found[:2]) + ". numba's simulator raises no error for a barrier that only "
            "some threads reach: it releases a barrier as soon as every live thread waits at *any* barrier, so "
            "different syncthreads()/shuffle calls pair up silently and threads read shared memory too early. "
            "On a GPU this can hang or be undefined too: let every thread of the block make the same barrier and "
            "shuffle calls (notebook 01, section 5).")


def _own_frame(exc: BaseException) -> str:
    """The innermost frame of the exception that is in the learner's code (not the package, not a library)."""
    package = Path(__file__).resolve().parents[2]
    skip = [str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    skip += [str(package / "minivllm"), str(package / "kernels")]
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        where = str(Path(frame.filename).resolve()) if frame.filename and not frame.filename.startswith("<") else ""
        if where and not any(where.startswith(s) for s in skip):
            line = f": {frame.line.strip()}" if frame.line else ""
            return f" (in {frame.name}, line {frame.lineno}{line})"
    return ""


def explain_exception(exc: BaseException, uses: Sequence[object] = ()) -> str:
    """What a learner's function raised, where in their code, and a hint for the usual cause."""
    text = f"{type(exc).__name__}: {exc}{_own_frame(exc)}"
    if isinstance(exc, IndexError):
        text += (" — in the simulator this usually means an index past an array's end: check your bounds"
                 if _simulator_on() else " — an index past the end of a list or tensor: check your bounds")
    return text + barrier_hint(uses)
